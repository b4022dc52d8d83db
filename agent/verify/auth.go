package verify

import (
	"context"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// Credentials returns the credentials that the node's credential sources
// (docker config, credential provider plugins) give registry host (host or
// host:port, case-insensitive; Docker Hub's entry also answers for
// docker.io), and false when they give none. Callers pass the host of the
// one image they act on, so credentials never travel to another registry.
// The answer must never be logged.
func (v *Verifier) Credentials(host string) (authn.AuthConfig, bool) {
	reg, err := name.NewRegistry(strings.ToLower(host))
	if err != nil {
		return authn.AuthConfig{}, false
	}
	a, err := authn.Resolve(context.Background(), v.keychain, reg)
	if err != nil || a == authn.Anonymous {
		return authn.AuthConfig{}, false
	}
	ac, err := authn.Authorization(context.Background(), a)
	if err != nil || *ac == (authn.AuthConfig{}) {
		return authn.AuthConfig{}, false
	}
	return *ac, true
}

// keychainGuard adapts the node keychain to the transport's basicGuard.
type keychainGuard struct {
	k interface{ AllowsBasic(host, h string) bool }
}

func (g keychainGuard) allowsBasic(host, h string) bool { return g.k.AllowsBasic(host, h) }
