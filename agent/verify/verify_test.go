package verify

import (
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	ggstatic "github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/pinwarden/pinwarden/agent/verdict"
	ociremote "github.com/sigstore/cosign/v2/pkg/oci/remote"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// net/http keeps idle connections of the default transport alive.
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
	)
}

const (
	issuer = "https://token.actions.githubusercontent.com"
	ident  = "ci@example.com"
)

func keysYAML(root string, threshold int, tlog bool, keys ...testKey) string {
	var b strings.Builder
	if root != "" {
		fmt.Fprintf(&b, "trustedRoot: %s\n", root)
	}
	b.WriteString("policies:\n- name: test\n  images: [\"**\"]\n  keys:\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "  - %s\n", k.pubPath)
	}
	if threshold > 0 {
		fmt.Fprintf(&b, "  threshold: %d\n", threshold)
	}
	if tlog {
		b.WriteString("  tlog: true\n")
	}
	return b.String()
}

func keylessYAML(root, subject, subjectRE string) string {
	s := fmt.Sprintf("trustedRoot: %s\npolicies:\n- name: test\n  images: [\"**\"]\n  keyless:\n  - issuer: %s\n", root, issuer)
	if subject != "" {
		s += fmt.Sprintf("    subject: %q\n", subject)
	}
	if subjectRE != "" {
		s += fmt.Sprintf("    subjectRegExp: %q\n", subjectRE)
	}
	return s
}

type env struct {
	reg  *testRegistry
	vs   *virtualSigstore
	keys map[string]testKey
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{reg: newTestRegistry(t, true), vs: newVirtualSigstore(t), keys: map[string]testKey{}}
	for _, k := range []string{"ecdsa-p256", "ecdsa-p384", "ed25519", "rsa", "other"} {
		kind := k
		if k == "other" {
			kind = "ecdsa-p256"
		}
		e.keys[k] = newTestKey(t, kind)
	}
	return e
}

func TestVerify(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	type setup func(t *testing.T, e *env, d name.Digest) string
	signWith := func(kind string) setup {
		return func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{keySig(t, e.keys[kind], simplePayload(t, d))})
			return keysYAML("", 0, false, e.keys[kind])
		}
	}
	tests := []struct {
		name       string
		setup      setup
		want       verdict.Verdict
		reason     string
		wantSigner string // "key:<kind>" or an identity
	}{
		{"ecdsa p256 verified", signWith("ecdsa-p256"), verdict.Verified, "", "key:ecdsa-p256"},
		{"ecdsa p384 verified", signWith("ecdsa-p384"), verdict.Verified, "", "key:ecdsa-p384"},
		{"ed25519 verified", signWith("ed25519"), verdict.Verified, "", "key:ed25519"},
		{"rsa verified", signWith("rsa"), verdict.Verified, "", "key:rsa"},
		{"unsigned", func(t *testing.T, e *env, d name.Digest) string {
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonNoSignature, ""},
		{"wrong key", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{keySig(t, e.keys["other"], simplePayload(t, d))})
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"signature copied from another image", func(t *testing.T, e *env, d name.Digest) string {
			a := e.reg.pushImage(t, "other/a")
			// A's real signature layer, under B's .sig tag.
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{keySig(t, e.keys["ecdsa-p256"], simplePayload(t, a))})
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonDigestMismatch, ""},
		{"payload names another digest", func(t *testing.T, e *env, d name.Digest) string {
			other := d.Context().Digest("sha256:" + strings.Repeat("ab", 32))
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{keySig(t, e.keys["ecdsa-p256"], simplePayload(t, other))})
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonDigestMismatch, ""},
		{"keyless right identity", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{e.vs.keylessSig(t, ident, issuer, simplePayload(t, d), true)})
			return keylessYAML(e.vs.rootPath, ident, "")
		}, verdict.Verified, "", issuer + " " + ident},
		{"keyless regexp identity", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{e.vs.keylessSig(t, ident, issuer, simplePayload(t, d), true)})
			return keylessYAML(e.vs.rootPath, "", `[a-z]+@example\.com`)
		}, verdict.Verified, "", issuer + " " + ident},
		{"keyless wrong identity", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{e.vs.keylessSig(t, "mallory@example.com", issuer, simplePayload(t, d), true)})
			return keylessYAML(e.vs.rootPath, ident, "")
		}, verdict.Unverified, verdict.ReasonIdentityMismatch, ""},
		{"keyless wrong issuer", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{e.vs.keylessSig(t, ident, "https://evil.example", simplePayload(t, d), true)})
			return keylessYAML(e.vs.rootPath, ident, "")
		}, verdict.Unverified, verdict.ReasonIdentityMismatch, ""},
		{"keyless regexp matching only as substring", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{e.vs.keylessSig(t, "evil-ci@example.com.attacker.net", issuer, simplePayload(t, d), true)})
			return keylessYAML(e.vs.rootPath, "", `ci@example\.com`)
		}, verdict.Unverified, verdict.ReasonIdentityMismatch, ""},
		{"keyless signature without tlog", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{e.vs.keylessSig(t, ident, issuer, simplePayload(t, d), false)})
			return keylessYAML(e.vs.rootPath, ident, "")
		}, verdict.Unverified, verdict.ReasonTlogMissing, ""},
		{"keyless signature copied from another image", func(t *testing.T, e *env, d name.Digest) string {
			a := e.reg.pushImage(t, "other/a")
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{e.vs.keylessSig(t, ident, issuer, simplePayload(t, a), true)})
			return keylessYAML(e.vs.rootPath, ident, "")
		}, verdict.Unverified, verdict.ReasonDigestMismatch, ""},
		{"keyless, logged after the certificate expired", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{e.vs.keylessSigAt(t, ident, issuer, simplePayload(t, d), true, time.Now().Add(30*time.Minute))})
			return keylessYAML(e.vs.rootPath, ident, "")
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"keyless, logged before the certificate was issued", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{e.vs.keylessSigAt(t, ident, issuer, simplePayload(t, d), true, time.Now().Add(-30*time.Minute))})
			return keylessYAML(e.vs.rootPath, ident, "")
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"key tlog required but missing", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{keySig(t, e.keys["ecdsa-p256"], simplePayload(t, d))})
			return keysYAML(e.vs.rootPath, 0, true, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonTlogMissing, ""},
		{"threshold 2 with one key", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{keySig(t, e.keys["ecdsa-p256"], simplePayload(t, d))})
			return keysYAML("", 2, false, e.keys["ecdsa-p256"], e.keys["ed25519"])
		}, verdict.Unverified, verdict.ReasonThresholdNotMet, ""},
		{"threshold 2 with two keys", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{
				keySig(t, e.keys["ecdsa-p256"], simplePayload(t, d)), keySig(t, e.keys["ed25519"], simplePayload(t, d))})
			return keysYAML("", 2, false, e.keys["ecdsa-p256"], e.keys["ed25519"])
		}, verdict.Verified, "", "key:ed25519"},
		{"threshold 2, same key signed twice", func(t *testing.T, e *env, d name.Digest) string {
			pl := simplePayload(t, d)
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{keySig(t, e.keys["ecdsa-p256"], pl), keySig(t, e.keys["ecdsa-p256"], append(pl, ' '))})
			return keysYAML("", 2, false, e.keys["ecdsa-p256"], e.keys["ed25519"])
		}, verdict.Unverified, verdict.ReasonThresholdNotMet, ""},
		{"threshold 2, two identities matching one signer", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{e.vs.keylessSig(t, ident, issuer, simplePayload(t, d), true)})
			return fmt.Sprintf("trustedRoot: %s\npolicies:\n- name: test\n  images: [\"**\"]\n  threshold: 2\n  keyless:\n  - issuer: %s\n    subject: %s\n  - issuer: %s\n    subjectRegExp: '.*@example\\.com'\n", e.vs.rootPath, issuer, ident, issuer)
		}, verdict.Unverified, verdict.ReasonThresholdNotMet, ""},
		{"101 signature layers", func(t *testing.T, e *env, d name.Digest) string {
			l := keySig(t, e.keys["ecdsa-p256"], simplePayload(t, d))
			ls := make([]sigLayer, 101)
			for i := range ls {
				ls[i] = l
			}
			putSigManifest(t, d.Context(), sigTag(d), ls)
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonTooLarge, ""},
		{"1000 signature layers", func(t *testing.T, e *env, d name.Digest) string {
			l := keySig(t, e.keys["ecdsa-p256"], simplePayload(t, d))
			ls := make([]sigLayer, 1000)
			for i := range ls {
				ls[i] = l
			}
			putSigManifest(t, d.Context(), sigTag(d), ls)
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonTooLarge, ""},
		{"layer claiming 1 GiB", func(t *testing.T, e *env, d name.Digest) string {
			l := keySig(t, e.keys["ecdsa-p256"], simplePayload(t, d))
			l.size = 1 << 30
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{l})
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonTooLarge, ""},
		{"malformed base64 signature", func(t *testing.T, e *env, d name.Digest) string {
			l := keySig(t, e.keys["ecdsa-p256"], simplePayload(t, d))
			l.ann[annSignature] = "!!!not base64!!!"
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{l})
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"truncated JSON payload, validly signed", func(t *testing.T, e *env, d name.Digest) string {
			pl := simplePayload(t, d)
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{keySig(t, e.keys["ecdsa-p256"], pl[:len(pl)/2])})
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"truncated rekor bundle annotation", func(t *testing.T, e *env, d name.Digest) string {
			l := e.vs.keylessSig(t, ident, issuer, simplePayload(t, d), true)
			l.ann[annBundle] = l.ann[annBundle][:20]
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{l})
			return keylessYAML(e.vs.rootPath, ident, "")
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"missing signature annotation", func(t *testing.T, e *env, d name.Digest) string {
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{{payload: simplePayload(t, d), ann: map[string]string{}}})
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"bundle signed by key", func(t *testing.T, e *env, d name.Digest) string {
			attachBundle(t, d, keyBundle(t, e.keys["ecdsa-p256"], cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1")))
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Verified, "", "key:ecdsa-p256"},
		{"bundle signed by wrong key", func(t *testing.T, e *env, d name.Digest) string {
			attachBundle(t, d, keyBundle(t, e.keys["other"], cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1")))
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"bundle naming another digest", func(t *testing.T, e *env, d name.Digest) string {
			a := e.reg.pushImage(t, "other/a")
			attachBundle(t, d, keyBundle(t, e.keys["ecdsa-p256"], cosignStatement(t, a, "https://sigstore.dev/cosign/sign/v1")))
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonDigestMismatch, ""},
		{"bundle with another predicate (an SBOM attestation is not a signature)", func(t *testing.T, e *env, d name.Digest) string {
			attachBundle(t, d, keyBundle(t, e.keys["ecdsa-p256"], cosignStatement(t, d, "https://spdx.dev/Document")))
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"truncated bundle JSON", func(t *testing.T, e *env, d name.Digest) string {
			b := keyBundle(t, e.keys["ecdsa-p256"], cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1"))
			attachBundle(t, d, b[:len(b)/2])
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"DSSE with a garbage payload", func(t *testing.T, e *env, d name.Digest) string {
			attachBundle(t, d, keyBundle(t, e.keys["ecdsa-p256"], []byte("\x00garbage{")))
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"bundle referrer with two layers", func(t *testing.T, e *env, d name.Digest) string {
			b := keyBundle(t, e.keys["ecdsa-p256"], cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1"))
			l := ggstatic.NewLayer(b, BundleMediaType)
			if err := ociremote.WriteReferrer(d, BundleMediaType, []v1.Layer{l, l}, map[string]string{"dev.sigstore.bundle.content": "dsse-envelope"}); err != nil {
				t.Fatal(err)
			}
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"bundle referrer with the wrong layer media type", func(t *testing.T, e *env, d name.Digest) string {
			b := keyBundle(t, e.keys["ecdsa-p256"], cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1"))
			if err := ociremote.WriteReferrer(d, BundleMediaType, []v1.Layer{ggstatic.NewLayer(b, "application/json")}, map[string]string{"dev.sigstore.bundle.content": "dsse-envelope"}); err != nil {
				t.Fatal(err)
			}
			return keysYAML("", 0, false, e.keys["ecdsa-p256"])
		}, verdict.Unverified, verdict.ReasonInvalidSignature, ""},
		{"keyless bundle", func(t *testing.T, e *env, d name.Digest) string {
			attachBundle(t, d, e.vs.keylessBundle(t, ident, issuer, cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1")))
			return keylessYAML(e.vs.rootPath, ident, "")
		}, verdict.Verified, "", issuer + " " + ident},
		{"keyless bundle, wrong identity", func(t *testing.T, e *env, d name.Digest) string {
			attachBundle(t, d, e.vs.keylessBundle(t, "mallory@example.com", issuer, cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1")))
			return keylessYAML(e.vs.rootPath, ident, "")
		}, verdict.Unverified, verdict.ReasonIdentityMismatch, ""},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d := e.reg.pushImage(t, fmt.Sprintf("case/%d", i))
			p := policyFor(t, tt.setup(t, e, d))
			v := newTestVerifier(t, e.reg, nil)
			start := time.Now()
			res := v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr())
			if el := time.Since(start); el > 10*time.Second {
				t.Errorf("took %v", el)
			}
			t.Logf("%s/%s: %s", res.Verdict, res.Reason, res.Detail)
			if res.Verdict != tt.want || res.Reason != tt.reason {
				t.Fatalf("got %s/%s (%s), want %s/%s", res.Verdict, res.Reason, res.Detail, tt.want, tt.reason)
			}
			if res.Digest != d.DigestStr() || res.Policy != "test" || res.Fingerprint != p.Fingerprint {
				t.Errorf("result identity fields wrong: %+v", res)
			}
			if tt.wantSigner != "" {
				want := tt.wantSigner
				if k, ok := strings.CutPrefix(want, "key:"); ok {
					want = e.keys[k].id
				}
				found := false
				for _, s := range res.Signers {
					found = found || s == want
				}
				if !found {
					t.Errorf("signers %v, want %s", res.Signers, want)
				}
			}
			if tt.want != verdict.Verified && len(res.Signers) > 0 {
				t.Errorf("signers %v on a %s result", res.Signers, res.Verdict)
			}
		})
	}
}

// A 1 GiB layer descriptor must be refused without requesting the blob.
func TestHugeLayerNotRead(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	d := e.reg.pushImage(t, "huge")
	l := keySig(t, e.keys["ecdsa-p256"], simplePayload(t, d))
	l.size = 1 << 30
	putSigManifest(t, d.Context(), sigTag(d), []sigLayer{l})
	var blobGets atomic.Int64
	e.reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/blobs/") {
			blobGets.Add(1)
		}
		return false
	})
	res := newTestVerifier(t, e.reg, nil).Verify(t.Context(), policyFor(t, keysYAML("", 0, false, e.keys["ecdsa-p256"])), d.Context().Name(), d.DigestStr())
	if res.Verdict != verdict.Unverified || res.Reason != verdict.ReasonTooLarge {
		t.Fatalf("got %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
	}
	if n := blobGets.Load(); n != 0 {
		t.Fatalf("%d blob requests for a layer refused by its descriptor", n)
	}
}
