// Package anchor anchors keyless identity regular expressions so that they
// must match a whole certificate subject. cosign and sigstore-go match
// identity regexps unanchored; pinwarden anchors them here, in one place,
// for config validation, policy compilation and the verifier's own check.
//
// Anchoring works on the parsed expression, never on its text: wrapping the
// text in "^(?:" and ")$" turns `a)|(.*` into an alternation that matches
// anyone.
package anchor

import (
	"errors"
	"fmt"
	"regexp"
	"regexp/syntax"
)

// flags are the syntax flags of regexp.Compile, which cosign uses too.
const flags = syntax.Perl

// Regexp compiles expr on its own, refusing anything that does not parse
// alone, then anchors its parsed form at the start and end of the text. It
// returns the anchored expression (the text handed to cosign) and its
// compiled form.
func Regexp(expr string) (string, *regexp.Regexp, error) {
	if _, err := regexp.Compile(expr); err != nil {
		return "", nil, fmt.Errorf("invalid regexp %q: %w", expr, err)
	}
	re, err := syntax.Parse(expr, flags)
	if err != nil {
		return "", nil, fmt.Errorf("invalid regexp %q: %w", expr, err)
	}
	anchored := &syntax.Regexp{Op: syntax.OpConcat, Flags: flags, Sub: []*syntax.Regexp{
		{Op: syntax.OpBeginText, Flags: flags},
		re,
		{Op: syntax.OpEndText, Flags: flags | syntax.WasDollar},
	}}
	want := anchored.String()
	// The familiar "^(?:...)$" text around the canonical rendering of the
	// parsed expression (which is balanced, unlike the user's text) when it
	// parses back to exactly the anchored form; the anchored form's own
	// rendering ("\A...$") otherwise.
	s := "^(?:" + re.String() + ")$"
	if back, err := syntax.Parse(s, flags); err != nil || back.String() != want {
		s = want
	}
	// The text must itself parse to an anchored expression: checked, not
	// assumed.
	if err := Check(s); err != nil {
		return "", nil, fmt.Errorf("anchoring regexp %q: %w", expr, err)
	}
	c, err := regexp.Compile(s)
	if err != nil {
		return "", nil, fmt.Errorf("anchoring regexp %q: %w", expr, err)
	}
	return s, c, nil
}

// ErrNotAnchored is returned by Check for an expression that can match less
// than the whole text.
var ErrNotAnchored = errors.New("regexp is not anchored at both ends of the text")

// Check reports whether expr, parsed, can only match a whole text: a
// concatenation that starts at the beginning of the text and ends at its end.
// A text that merely starts with "^" and ends with "$" is not enough.
func Check(expr string) error {
	re, err := syntax.Parse(expr, flags)
	if err != nil {
		return fmt.Errorf("invalid regexp %q: %w", expr, err)
	}
	if re.Op != syntax.OpConcat || len(re.Sub) < 2 ||
		re.Sub[0].Op != syntax.OpBeginText || re.Sub[len(re.Sub)-1].Op != syntax.OpEndText {
		return fmt.Errorf("%w: %q", ErrNotAnchored, expr)
	}
	return nil
}
