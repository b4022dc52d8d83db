package verify

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/pinwarden/pinwarden/agent/verdict"
)

// cosign reads trust and locations from the environment; pinwarden must not.
// Each variable points at something that WOULD change the verdict if read.
// (Not parallel: t.Setenv.)
func TestCosignEnvironmentIgnored(t *testing.T) {
	reg := newTestRegistry(t, true)
	trusted := newVirtualSigstore(t)
	rogue := newVirtualSigstore(t) // a Fulcio/Rekor the config does not trust
	k := newTestKey(t, "ecdsa-p256")

	// COSIGN_REPOSITORY: a repository holding a valid signature for an image
	// that has none of its own.
	unsigned := reg.pushImage(t, "env/unsigned")
	sigRepo := unsigned.Context().Registry.Repo("env", "sigs")
	putSigManifest(t, sigRepo, sigTag(unsigned), []sigLayer{keySig(t, k, simplePayload(t, unsigned))})

	// SIGSTORE_ROOT_FILE: the rogue root, which did sign this image.
	rogueSigned := reg.pushImage(t, "env/rogue")
	putSigManifest(t, rogueSigned.Context(), sigTag(rogueSigned), []sigLayer{rogue.keylessSig(t, ident, issuer, simplePayload(t, rogueSigned), true)})

	good := reg.pushImage(t, "env/good")
	putSigManifest(t, good.Context(), sigTag(good), []sigLayer{trusted.keylessSig(t, ident, issuer, simplePayload(t, good), true)})

	// DOCKER_CONFIG: credentials for a registry that demands them.
	var sawAuth atomic.Int64
	reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Authorization") != "" {
			sawAuth.Add(1)
		}
		return false
	})
	dockerDir := t.TempDir()
	cfg := fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, reg.host, base64.StdEncoding.EncodeToString([]byte("env:leak")))
	if err := os.WriteFile(filepath.Join(dockerDir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	junk := filepath.Join(t.TempDir(), "junk")
	if err := os.WriteFile(junk, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("COSIGN_REPOSITORY", sigRepo.Name())
	t.Setenv("SIGSTORE_ROOT_FILE", rogue.rootPath)
	t.Setenv("TUF_ROOT", junk)
	t.Setenv("TUF_MIRROR", "http://127.0.0.1:1")
	t.Setenv("SIGSTORE_REKOR_PUBLIC_KEY", junk)
	t.Setenv("SIGSTORE_CT_LOG_PUBLIC_KEY_FILE", junk)
	t.Setenv("SIGSTORE_TSA_CERTIFICATE_FILE", junk)
	t.Setenv("DOCKER_CONFIG", dockerDir)
	t.Setenv("HOME", dockerDir)

	v := newTestVerifier(t, reg, nil)
	keyless := policyFor(t, keylessYAML(trusted.rootPath, ident, ""))
	tests := []struct {
		name   string
		verify func() verdict.Result
		want   verdict.Verdict
		reason string
	}{
		{"COSIGN_REPOSITORY not followed", func() verdict.Result {
			return v.Verify(t.Context(), policyFor(t, keysYAML("", 0, false, k)), unsigned.Context().Name(), unsigned.DigestStr())
		}, verdict.Unverified, verdict.ReasonNoSignature},
		{"SIGSTORE_ROOT_FILE not trusted", func() verdict.Result {
			return v.Verify(t.Context(), keyless, rogueSigned.Context().Name(), rogueSigned.DigestStr())
		}, verdict.Unverified, verdict.ReasonInvalidSignature},
		{"configured root still works", func() verdict.Result {
			return v.Verify(t.Context(), keyless, good.Context().Name(), good.DigestStr())
		}, verdict.Verified, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := tt.verify()
			if res.Verdict != tt.want || res.Reason != tt.reason {
				t.Fatalf("got %s/%s (%s), want %s/%s", res.Verdict, res.Reason, res.Detail, tt.want, tt.reason)
			}
		})
	}
	if n := sawAuth.Load(); n != 0 {
		t.Errorf("%d requests carried credentials from $DOCKER_CONFIG", n)
	}
}
