package policy

import (
	"strings"
	"testing"

	"github.com/pinwarden/pinwarden/agent/config"
)

// FuzzNormalizeGlob: a normalized glob is stable under normalization, and a
// glob without wildcards names exactly the repository that the same text
// names as an image reference, so a policy written either way matches the
// same images (issue 10 hole 6).
func FuzzNormalizeGlob(f *testing.F) {
	for _, s := range []string{"nginx", "library/nginx", "docker.io/nginx", "index.docker.io/library/nginx",
		"index.docker.io/library/*", "*", "*/nginx", "**", "**/x", "ghcr.io/acme/*", "localhost/app", "localhost",
		"a.b", "127.0.0.1:5000/**", "reg.example.:443/x", "docker.io/**", "UPPER/x", "a//b", "*.gcr.io/**"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, g string) {
		n, err := config.NormalizeGlob(g)
		if err != nil {
			return
		}
		again, err := config.NormalizeGlob(n)
		if err != nil || again != n {
			t.Fatalf("NormalizeGlob(%q) = %q, but NormalizeGlob(%q) = %q, %v", g, n, n, again, err)
		}
		if strings.Contains(g, "*") {
			return
		}
		ref, err := ParseReference(g)
		if err != nil {
			return
		}
		if ref.Tag == "" && ref.Digest == "" && ref.Repo != n {
			t.Fatalf("glob %q normalizes to %q, the reference to %q", g, n, ref.Repo)
		}
	})
}
