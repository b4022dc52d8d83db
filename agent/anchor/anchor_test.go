package anchor

import (
	"errors"
	"regexp"
	"testing"
)

func TestRegexp(t *testing.T) {
	t.Parallel()
	tests := []struct {
		expr     string
		match    []string
		nomatch  []string
		wantFail bool
	}{
		{expr: `ci@example\.com)|(.*`, wantFail: true},
		{expr: `a)(b`, wantFail: true},
		{expr: `)`, wantFail: true},
		{expr: `(`, wantFail: true},
		{expr: `ci@example\.com`, match: []string{"ci@example.com"}, nomatch: []string{"xci@example.com", "ci@example.comx", "ci@exampleXcom"}},
		{expr: `a|b`, match: []string{"a", "b"}, nomatch: []string{"ab", "xa", "b\n"}},
		{expr: `.*@example\.com`, match: []string{"alice@example.com"}, nomatch: []string{"alice@example.com\nx", "alice@example.community"}},
		{expr: `(?m)^ci$`, match: []string{"ci"}, nomatch: []string{"x\nci", "ci\nx"}},
		{expr: `(?s).*`, match: []string{"", "a\nb"}},
		{expr: `^already$`, match: []string{"already"}, nomatch: []string{"already\n"}},
		{expr: `https://github\.com/acme/[^/]+/\.github/workflows/release\.yml@refs/tags/v.*`,
			match:   []string{"https://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1.2"},
			nomatch: []string{"https://github.com/acme/app/x/.github/workflows/release.yml@refs/tags/v1", "xhttps://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1"}},
	}
	for _, tt := range tests {
		s, re, err := Regexp(tt.expr)
		if tt.wantFail {
			if err == nil {
				t.Errorf("%q anchored to %q, want an error", tt.expr, s)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%q: %v", tt.expr, err)
		}
		if err := Check(s); err != nil {
			t.Errorf("%q: anchored form fails Check: %v", tt.expr, err)
		}
		// The text (what cosign compiles) and the compiled form agree.
		text := regexp.MustCompile(s)
		for _, m := range tt.match {
			if !re.MatchString(m) || !text.MatchString(m) {
				t.Errorf("%q (%q) does not match %q", tt.expr, s, m)
			}
		}
		for _, m := range tt.nomatch {
			if re.MatchString(m) || text.MatchString(m) {
				t.Errorf("%q (%q) matches %q", tt.expr, s, m)
			}
		}
	}
}

func TestCheck(t *testing.T) {
	t.Parallel()
	for _, s := range []string{`^(?:ci@example\.com)|(.*)$`, `ci`, `^ci`, `ci$`, `(?m)^ci$`, `^a$|^b$`, ``} {
		if err := Check(s); !errors.Is(err, ErrNotAnchored) {
			t.Errorf("Check(%q) = %v, want ErrNotAnchored", s, err)
		}
	}
	for _, s := range []string{`^(?:ci)$`, `\Aci\z`, `^$`, `^(?:a|b)$`} {
		if err := Check(s); err != nil {
			t.Errorf("Check(%q) = %v", s, err)
		}
	}
	if err := Check(`(`); err == nil || errors.Is(err, ErrNotAnchored) {
		t.Errorf("Check of an invalid regexp = %v", err)
	}
}

// The anchored text reads like the configured one where it can.
func TestRegexpText(t *testing.T) {
	t.Parallel()
	for expr, want := range map[string]string{
		`ci@example\.com`: `^(?:ci@example\.com)$`,
		`a|b`:             `^(?:[ab])$`,
		`x|yz`:            `^(?:x|yz)$`,
	} {
		if got, _, err := Regexp(expr); err != nil || got != want {
			t.Errorf("Regexp(%q) = %q, %v; want %q", expr, got, err, want)
		}
	}
}
