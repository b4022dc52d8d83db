package verify

import (
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
)

// Credentials returns the credentials that the configured docker config.json
// gives registry host (host or host:port, case-insensitive; Docker Hub's
// entry also answers for docker.io), and false when it gives none. Callers
// pass the host of the one image they act on, so credentials never travel to
// another registry. The answer must never be logged.
func (v *Verifier) Credentials(host string) (authn.AuthConfig, bool) {
	ac, ok := v.keychain.byHost[strings.ToLower(host)]
	return ac, ok
}
