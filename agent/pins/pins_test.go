package pins

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const (
	h1 = "1111111111111111111111111111111111111111111111111111111111111111"
	h2 = "2222222222222222222222222222222222222222222222222222222222222222"
	d1 = "sha256:" + h1
	d2 = "sha256:" + h2
)

func TestParseValid(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   string
		want []Pin
	}{
		{
			name: "contract example with comments",
			in: "# shop pins\n\n" +
				"registry.example.com/shop/api:v2.1@" + d1 + "   # tag pinned to a digest\n" +
				"   registry.example.com/shop/worker@" + d2 + "\t# digest only\n" +
				"#registry.example.com/commented/out@" + d1 + "\n",
			want: []Pin{
				{Repo: "registry.example.com/shop/api", Tag: "v2.1", Digest: d1, Source: "f:3"},
				{Repo: "registry.example.com/shop/worker", Digest: d2, Source: "f:4"},
			},
		},
		{
			name: "implicit docker.io/library",
			in:   "nginx:1.27@" + d1 + "\nbusybox@" + d2,
			want: []Pin{
				{Repo: "docker.io/library/nginx", Tag: "1.27", Digest: d1, Source: "f:1"},
				{Repo: "docker.io/library/busybox", Digest: d2, Source: "f:2"},
			},
		},
		{
			name: "docker hub spellings",
			in:   "bitnami/redis:7@" + d1 + "\nindex.docker.io/library/alpine@" + d2 + "\ndocker.io/nginx@" + d2,
			want: []Pin{
				{Repo: "docker.io/bitnami/redis", Tag: "7", Digest: d1, Source: "f:1"},
				{Repo: "docker.io/library/alpine", Digest: d2, Source: "f:2"},
				{Repo: "docker.io/library/nginx", Digest: d2, Source: "f:3"},
			},
		},
		{
			name: "registry with port",
			in:   "localhost:5000/team/app:1.0@" + d1 + "\nregistry.local:443/app@" + d2 + "\n",
			want: []Pin{
				{Repo: "localhost:5000/team/app", Tag: "1.0", Digest: d1, Source: "f:1"},
				{Repo: "registry.local:443/app", Digest: d2, Source: "f:2"},
			},
		},
		{
			name: "crlf, bom and uppercase tag",
			in:   "\ufeffregistry.example.com/a:V1_RC-2.x@" + d1 + "\r\n\r\n",
			want: []Pin{{Repo: "registry.example.com/a", Tag: "V1_RC-2.x", Digest: d1, Source: "f:1"}},
		},
		{
			name: "exact duplicates merged, first source kept",
			in:   "reg.io/a:v1@" + d1 + "\nreg.io/a:v1@" + d1 + " # again\nreg.io/b@" + d2 + "\nreg.io/b@" + d2,
			want: []Pin{
				{Repo: "reg.io/a", Tag: "v1", Digest: d1, Source: "f:1"},
				{Repo: "reg.io/b", Digest: d2, Source: "f:3"},
			},
		},
		{
			name: "same digest with and without tag are two pins",
			in:   "reg.io/a:v1@" + d1 + "\nreg.io/a@" + d1,
			want: []Pin{
				{Repo: "reg.io/a", Tag: "v1", Digest: d1, Source: "f:1"},
				{Repo: "reg.io/a", Digest: d1, Source: "f:2"},
			},
		},
		{
			name: "two tags on one digest",
			in:   "reg.io/a:v1@" + d1 + "\nreg.io/a:stable@" + d1,
			want: []Pin{
				{Repo: "reg.io/a", Tag: "v1", Digest: d1, Source: "f:1"},
				{Repo: "reg.io/a", Tag: "stable", Digest: d1, Source: "f:2"},
			},
		},
		{name: "empty file", in: "", want: nil},
		{name: "only comments", in: "# nothing\n   # pinned\n\n", want: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := Parse(strings.NewReader(tt.in), "f")
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("got  %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestPinRefs(t *testing.T) {
	t.Parallel()
	p := Pin{Repo: "docker.io/library/nginx", Tag: "1.27", Digest: d1}
	if p.Ref() != "docker.io/library/nginx@"+d1 || p.TagRef() != "docker.io/library/nginx:1.27" ||
		p.String() != "docker.io/library/nginx:1.27@"+d1 {
		t.Errorf("Ref=%q TagRef=%q String=%q", p.Ref(), p.TagRef(), p.String())
	}
	p.Tag = ""
	if p.TagRef() != "" || p.String() != p.Ref() {
		t.Errorf("digest-only: TagRef=%q String=%q", p.TagRef(), p.String())
	}
}

func TestParseInvalid(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		line string
		want string // substring of the error
	}{
		{"missing digest", "registry.example.com/shop/api:v2.1", "names no digest"},
		{"missing digest, no tag", "nginx", "names no digest"},
		{"uppercase repository", "registry.example.com/Shop/api@" + d1, "lowercase"},
		{"uppercase registry", "Registry.Example.com/shop/api@" + d1, "lowercase"},
		{"uppercase digest hex", "reg.io/a@sha256:" + strings.ToUpper(strings.Repeat("ab", 32)), "lowercase"},
		{"digest too short", "reg.io/a@sha256:" + h1[:63], "64 lowercase hex characters"},
		{"digest too long", "reg.io/a@sha256:" + h1 + "1", "64 lowercase hex characters"},
		{"digest not hex", "reg.io/a@sha256:" + strings.Repeat("g", 64), "64 lowercase hex characters"},
		{"digest wrong algorithm", "reg.io/a@sha512:" + h1 + h1, "unsupported digest algorithm"},
		{"digest without algorithm", "reg.io/a@" + h1, "has no algorithm"},
		{"empty digest", "reg.io/a@", "has no algorithm"},
		{"two @", "reg.io/a@" + d1 + "@" + d2, "64 lowercase hex characters"},
		{"garbage", "!!!@@@###", "invalid image reference"},
		{"garbage symbols", "%%%%@" + d1, "repository can only contain"},
		{"two references on a line", "reg.io/a@" + d1 + " reg.io/b@" + d2, "unexpected text"},
		{"empty tag", "reg.io/a:@" + d1, "tag"},
		{"bad tag character", "reg.io/a:v1+x@" + d1, "tag"},
		{"tag starting with dot", "reg.io/a:.v1@" + d1, "tag"},
		{"tag too long", "reg.io/a:" + strings.Repeat("t", 129) + "@" + d1, "tag"},
		{"path traversal", "reg.io/../etc@" + d1, "path segment"},
		{"double slash", "reg.io//a@" + d1, "path segment"},
		{"trailing slash", "reg.io/a/@" + d1, "path segment"},
		{"leading dash component", "reg.io/-a@" + d1, "path segment"},
		{"bad port", "reg.io:http/a@" + d1, "registries must be valid"},
		{"scheme", "https://reg.io/a@" + d1, ""},
		{"nul byte", "reg.io/a\x00b@" + d1, "invalid image reference"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			in := "reg.io/ok@" + d1 + "   # a valid line\n" + tt.line + "\n"
			got, err := Parse(strings.NewReader(in), "pins.txt")
			if err == nil {
				t.Fatalf("Parse accepted %q: %+v", tt.line, got)
			}
			if got != nil {
				t.Errorf("a rejected file returned pins: %+v", got)
			}
			msg := err.Error()
			if !strings.Contains(msg, "pins.txt:2:") {
				t.Errorf("error does not name pins.txt:2: %v", err)
			}
			if !strings.Contains(msg, tt.want) {
				t.Errorf("error %q does not contain %q", msg, tt.want)
			}
		})
	}
}

func TestParseReportsEveryInvalidLine(t *testing.T) {
	t.Parallel()
	in := strings.Join([]string{
		"reg.io/a:v1@" + d1,
		"reg.io/b:v1",        // 2: no digest
		"reg.io/C@" + d1,     // 3: uppercase
		"",                   // 4
		"reg.io/a:v1@" + d2,  // 5: conflicts with line 1
		"reg.io/d@sha256:ab", // 6: short digest
	}, "\n")
	_, err := Parse(strings.NewReader(in), "p")
	if err == nil {
		t.Fatal("accepted")
	}
	for _, at := range []string{"p:2:", "p:3:", "p:5:", "p:6:"} {
		if !strings.Contains(err.Error(), at) {
			t.Errorf("error does not name %s: %v", at, err)
		}
	}
	if strings.Contains(err.Error(), "p:1:") || strings.Contains(err.Error(), "p:4:") {
		t.Errorf("error names a valid line: %v", err)
	}
	if !strings.Contains(err.Error(), "pinned to "+d2+", but p:1 pins it to "+d1) {
		t.Errorf("conflict not explained: %v", err)
	}
}

func TestParseLimits(t *testing.T) {
	t.Parallel()
	long := "reg.io/" + strings.Repeat("a", maxLineLength) + "@" + d1
	if _, err := Parse(strings.NewReader("reg.io/x@"+d1+"\n"+long), "p"); err == nil || !strings.Contains(err.Error(), "p:2: line longer") {
		t.Errorf("long line: %v", err)
	}
	big := strings.Repeat("# padding padding padding padding padding padding\n", MaxFileSize/50+10)
	if _, err := Parse(strings.NewReader(big), "p"); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("big file: %v", err)
	}
}

func TestLoadFiles(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a := write("a.pins", "reg.io/a:v1@"+d1+"\nreg.io/b@"+d2+"\n")
	b := write("b.pins", "# same pin again\nreg.io/a:v1@"+d1+"\nnginx:1@"+d2+"\n")
	conflict := write("c.pins", "reg.io/a:v1@"+d2+"\n")
	bad := write("d.pins", "reg.io/x\n")

	got, err := LoadFiles([]string{a, b})
	if err != nil {
		t.Fatalf("LoadFiles: %v", err)
	}
	want := []Pin{
		{Repo: "reg.io/a", Tag: "v1", Digest: d1, Source: a + ":1"},
		{Repo: "reg.io/b", Digest: d2, Source: a + ":2"},
		{Repo: "docker.io/library/nginx", Tag: "1", Digest: d2, Source: b + ":3"},
	}
	if !slices.Equal(got, want) {
		t.Errorf("got  %+v\nwant %+v", got, want)
	}

	tests := []struct {
		name  string
		paths []string
		want  []string
	}{
		{"conflict across files", []string{a, conflict}, []string{conflict + ":1", a + ":1"}},
		{"invalid file", []string{a, bad}, []string{bad + ":1", "names no digest"}},
		{"missing file", []string{a, filepath.Join(dir, "nope")}, []string{"nope"}},
		{"every problem", []string{bad, conflict, a}, []string{bad + ":1", conflict + ":1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := LoadFiles(tt.paths)
			if err == nil || got != nil {
				t.Fatalf("LoadFiles = %+v, %v; want an error and no pins", got, err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
	if _, err := LoadFiles([]string{filepath.Join(dir, "nope")}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file error does not wrap ErrNotExist: %v", err)
	}
}
