package policy

import (
	"errors"
	"strings"
	"testing"
)

var (
	hex64  = strings.Repeat("a", 64)
	dig    = "sha256:" + hex64
	dig512 = "sha512:" + strings.Repeat("b", 128)
)

func TestParseReference(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want Ref
		err  bool
	}{
		{in: "nginx", want: Ref{Repo: "docker.io/library/nginx"}},
		{in: "nginx:1.27", want: Ref{Repo: "docker.io/library/nginx", Tag: "1.27"}},
		{in: "library/nginx@" + dig, want: Ref{Repo: "docker.io/library/nginx", Digest: dig}},
		{in: "docker.io/nginx", want: Ref{Repo: "docker.io/library/nginx"}},
		{in: "index.docker.io/bitnami/redis:7", want: Ref{Repo: "docker.io/bitnami/redis", Tag: "7"}},
		{in: "ghcr.io/a/b:t@" + dig, want: Ref{Repo: "ghcr.io/a/b", Tag: "t", Digest: dig}},
		{in: "localhost:5000/x/y@" + dig512, want: Ref{Repo: "localhost:5000/x/y", Digest: dig512}},
		{in: "registry.example.com:8443/team/app:v2.1", want: Ref{Repo: "registry.example.com:8443/team/app", Tag: "v2.1"}},
		{in: "registry.k8s.io/pause:3.10", want: Ref{Repo: "registry.k8s.io/pause", Tag: "3.10"}},
		{in: "a/b__c/d-e.f", want: Ref{Repo: "docker.io/a/b__c/d-e.f"}},
		{in: "", err: true},
		{in: "Nginx", err: true},
		{in: "ghcr.io/A/b", err: true},
		{in: "GHCR.io/a/b", err: true},
		{in: "nginx@sha256:abc", err: true},
		{in: "nginx@sha256:" + strings.Repeat("a", 63), err: true},
		{in: "nginx@sha256:" + strings.Repeat("a", 65), err: true},
		{in: "nginx@sha256:" + strings.Repeat("A", 64), err: true},
		{in: "nginx@md5:" + strings.Repeat("a", 32), err: true},
		{in: "nginx@" + hex64, err: true},
		{in: "nginx@sha256:" + hex64 + "@sha256:" + hex64, err: true},
		{in: "ghcr.io/a/../b", err: true},
		{in: "ghcr.io/a/./b", err: true},
		{in: "ghcr.io//b", err: true},
		{in: "/ghcr.io/b", err: true},
		{in: "ghcr.io/b/", err: true},
		{in: "ghcr.io/a/-b", err: true},
		{in: "ghcr.io/a/b.", err: true},
		{in: "ghcr.io/a b", err: true},
		{in: "ghcr.io/a\\b", err: true},
		{in: "ghcr.io/a/b?x=1", err: true},
		{in: "ghcr.io/a/b#frag", err: true},
		{in: "ghcr.io/a/b:", err: true},
		{in: "ghcr.io/a/b:-bad", err: true},
		{in: "ghcr.io/a/b:" + strings.Repeat("t", 129), err: true},
		{in: " nginx", err: true},
		{in: "../0", err: true},
		{in: "-x.io/a", err: true},
		{in: "nginx\n", err: true},
		{in: strings.Repeat("a", 5000), err: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			t.Parallel()
			got, err := ParseReference(tt.in)
			if tt.err {
				if err == nil {
					t.Fatalf("ParseReference(%q) = %+v, want error", tt.in, got)
				}
				if !errors.Is(err, ErrInvalidReference) {
					t.Errorf("error %v does not wrap ErrInvalidReference", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseReference(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("ParseReference(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			again, err := ParseReference(got.String())
			if err != nil || again != got {
				t.Fatalf("round trip of %q: %+v, %v", got.String(), again, err)
			}
		})
	}
}

func FuzzParseReference(f *testing.F) {
	for _, s := range []string{"nginx", "ghcr.io/a/b:t@" + dig, "localhost:5000/x@" + dig512, "a/../b", "A", "x@sha256:", "host:1/p:t"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseReference(s)
		if err != nil {
			return
		}
		if r.Repo == "" || strings.ToLower(r.Repo) != r.Repo || strings.Contains(r.Repo, "..") || strings.Contains(r.Repo, "//") {
			t.Fatalf("ParseReference(%q) accepted repo %q", s, r.Repo)
		}
		if r.Digest != "" && ValidateDigest(r.Digest) != nil {
			t.Fatalf("ParseReference(%q) accepted digest %q", s, r.Digest)
		}
		again, err := ParseReference(r.String())
		if err != nil || again != r {
			t.Fatalf("round trip %q -> %q: %+v, %v", s, r.String(), again, err)
		}
		if _, err := r.Reference(); err != nil {
			t.Fatalf("accepted %q but ggcr rejects %q: %v", s, r.String(), err)
		}
	})
}
