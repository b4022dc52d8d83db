package verify

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/pinwarden/pinwarden/agent/policy"
	sgbundle "github.com/sigstore/sigstore-go/pkg/bundle"
	"github.com/sigstore/sigstore/pkg/signature/payload"
)

// FuzzLegacySignature feeds arbitrary payloads and annotations through the
// signature handling (annotation parsing, cosign verification, claim check).
// It must never panic, and a success must mean: the key signed exactly this
// payload, and the payload names exactly this digest.
func FuzzLegacySignature(f *testing.F) {
	k := newTestKey(f, "ecdsa-p256")
	vs := newVirtualSigstore(f)
	d, err := name.NewDigest("registry.example/app@sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	if err != nil {
		f.Fatal(err)
	}
	other, _ := name.NewDigest("registry.example/app@sha256:" + "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210")
	good := keySig(f, k, simplePayload(f, d))
	ks := keySig(f, k, simplePayload(f, other))
	kl := vs.keylessSig(f, ident, issuer, simplePayload(f, d), true)
	f.Add(good.payload, good.ann[annSignature], "", "", "")
	f.Add(ks.payload, ks.ann[annSignature], "", "", "")
	f.Add(kl.payload, kl.ann[annSignature], kl.ann[annCert], kl.ann[annChain], kl.ann[annBundle])
	f.Add(good.payload[:10], "!!", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----", "", `{"SignedEntryTimestamp":"AA==","Payload":{"body":1}}`)
	f.Add([]byte(`{"critical":{"type":"cosign container image signature","image":{"docker-manifest-digest":null}}}`), "", "", "", `{`)

	keyPol := policyFor(f, keysYAML("", 0, false, k))
	keylessPol := policyFor(f, keylessYAML(vs.rootPath, ident, ""))
	v, err := New(Options{})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, pl []byte, b64, cert, chain, bundle string) {
		ann := map[string]string{annSignature: b64, annCert: cert, annChain: chain, annBundle: bundle}
		sig, bad := buildSignature(pl, ann)
		for _, p := range []*policyPair{{keyPol, "key"}, {keylessPol, "keyless"}} {
			tl := newTally(p.p)
			v.checkLegacy(t.Context(), p.p, legacySig{sig: sig, bad: bad}, d, tl)
			if !tl.met() {
				continue
			}
			var sc payload.SimpleContainerImage
			if err := json.Unmarshal(pl, &sc); err != nil || sc.Critical.Image.DockerManifestDigest != d.DigestStr() {
				t.Fatalf("%s policy verified a payload that does not name the digest: %q", p.name, pl)
			}
			if p.name == "key" {
				raw, err := base64.StdEncoding.DecodeString(b64)
				if err != nil || k.sv.VerifySignature(bytes.NewReader(raw), bytes.NewReader(pl)) != nil {
					t.Fatalf("key policy verified a signature the key did not make")
				}
			}
		}
	})
}

type policyPair struct {
	p    *policy.Policy
	name string
}

// FuzzBundle: arbitrary bytes as a sigstore bundle: no panic, and success
// only for a bundle whose content names the digest.
func FuzzBundle(f *testing.F) {
	k := newTestKey(f, "ecdsa-p256")
	d, _ := name.NewDigest("registry.example/app@sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	good := keyBundle(f, k, cosignStatement(f, d, "https://sigstore.dev/cosign/sign/v1"))
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte(`{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json"}`))
	f.Add([]byte(`{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","dsseEnvelope":{"payload":"!!!","payloadType":"x"}}`))
	pol := policyFor(f, keysYAML("", 0, false, k))
	v, err := New(Options{})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var b sgbundle.Bundle
		if err := b.UnmarshalJSON(raw); err != nil {
			return
		}
		tl := newTally(pol)
		v.checkBundle(t.Context(), pol, sigBundle{b: &b}, d, tl)
		if tl.met() && bundleDigestMismatch(&b, d.DigestStr()[7:], nil) != nil && !bytes.Contains(raw, []byte(d.DigestStr()[7:])) {
			t.Fatalf("verified a bundle that does not name the digest")
		}
	})
}
