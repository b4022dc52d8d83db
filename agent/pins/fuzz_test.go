package pins

import (
	"strings"
	"testing"

	"github.com/pinwarden/pinwarden/agent/policy"
)

// FuzzParse: Parse must never panic, and whatever it accepts must be a
// well-formed pin that survives a round trip through String.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"",
		"# comment only\n",
		"registry.example.com/shop/api:v2.1@" + d1 + "   # tag pinned\n",
		"registry.example.com/shop/worker@" + d2 + "\n",
		"nginx:1.27@" + d1 + "\nbusybox@" + d2,
		"localhost:5000/team/app:1.0@" + d1,
		"\ufeffreg.io/a:v1@" + d1 + "\r\nreg.io/a:v1@" + d1,
		"reg.io/a:v1@" + d1 + "\nreg.io/a:v1@" + d2,
		"reg.io/A@" + d1,
		"reg.io/a@sha256:abc",
		"reg.io/a",
		"!!!@@@###",
		"reg.io/../x@" + d1,
		"reg.io:99999999999999999999/a@" + d1,
		"[::1]:5000/a@" + d1,
		"a@" + d1 + " b@" + d2,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		pins, err := Parse(strings.NewReader(in), "fuzz")
		if err != nil {
			if pins != nil {
				t.Fatalf("rejected input returned pins: %+v", pins)
			}
			return
		}
		for _, p := range pins {
			if !strings.HasPrefix(p.Digest, "sha256:") || policy.ValidateDigest(p.Digest) != nil {
				t.Fatalf("accepted bad digest %q from %q", p.Digest, in)
			}
			if p.Repo == "" || strings.ToLower(p.Repo) != p.Repo || strings.ContainsAny(p.Repo, "@ \t#") {
				t.Fatalf("accepted bad repo %q from %q", p.Repo, in)
			}
			again, err := ParseReference(p.String())
			if err != nil {
				t.Fatalf("pin %q does not parse again: %v", p.String(), err)
			}
			again.Source = p.Source
			if again != p {
				t.Fatalf("round trip changed %+v into %+v", p, again)
			}
		}
	})
}
