package verify

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/pinwarden/pinwarden/agent/policy"
	cbundle "github.com/sigstore/cosign/v2/pkg/cosign/bundle"
	protobundle "github.com/sigstore/protobuf-specs/gen/pb-go/bundle/v1"
	sgbundle "github.com/sigstore/sigstore-go/pkg/bundle"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// legacyParts are the security-relevant bytes of a .sig layer, decoded.
type legacyParts struct {
	payload, sig, cert []byte
	chain              [][]byte // DER
	set, body          []byte   // Rekor SET and entry body; nil: no Rekor bundle
	at                 int64
	logIndex           int64
	logID              string
}

func splitLegacy(t testing.TB, l sigLayer) legacyParts {
	t.Helper()
	p := legacyParts{payload: l.payload}
	var err error
	if p.sig, err = base64.StdEncoding.DecodeString(l.ann[annSignature]); err != nil {
		t.Fatal(err)
	}
	derOf := func(s string) [][]byte {
		var out [][]byte
		rest := []byte(s)
		for {
			var b *pem.Block
			if b, rest = pem.Decode(rest); b == nil {
				return out
			}
			out = append(out, b.Bytes)
		}
	}
	if c := derOf(l.ann[annCert]); len(c) == 1 {
		p.cert = c[0]
	}
	p.chain = derOf(l.ann[annChain])
	if raw := l.ann[annBundle]; raw != "" {
		var rb cbundle.RekorBundle
		if err := json.Unmarshal([]byte(raw), &rb); err != nil {
			t.Fatal(err)
		}
		if p.body, err = base64.StdEncoding.DecodeString(rb.Payload.Body.(string)); err != nil {
			t.Fatal(err)
		}
		p.set, p.at, p.logIndex, p.logID = rb.SignedEntryTimestamp, rb.Payload.IntegratedTime, rb.Payload.LogIndex, rb.Payload.LogID
	}
	return p
}

// layer re-encodes the parts the way cosign lays them out.
func (p legacyParts) layer() legacySig {
	pemOf := func(ders ...[]byte) string {
		var b bytes.Buffer
		for _, d := range ders {
			_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: d})
		}
		return b.String()
	}
	ann := map[string]string{annSignature: base64.StdEncoding.EncodeToString(p.sig)}
	if p.cert != nil {
		ann[annCert] = pemOf(p.cert)
		ann[annChain] = pemOf(p.chain...)
	}
	if p.body != nil {
		rb, _ := json.Marshal(cbundle.RekorBundle{SignedEntryTimestamp: p.set, Payload: cbundle.RekorPayload{
			Body: base64.StdEncoding.EncodeToString(p.body), IntegratedTime: p.at, LogIndex: p.logIndex, LogID: p.logID}})
		ann[annBundle] = string(rb)
	}
	sig, bad := buildSignature(p.payload, ann)
	return legacySig{sig: sig, bad: bad}
}

// mutateBytes flips bits of b at off (xor != 0) or cuts b at off (xor == 0). It
// returns false when that leaves b as it was.
func mutateBytes(b []byte, off uint32, xor byte) ([]byte, bool) {
	if len(b) == 0 {
		return nil, false
	}
	c := bytes.Clone(b)
	i := int(off % uint32(len(c)))
	if xor == 0 {
		return c[:i], true
	}
	c[i] ^= xor
	return c, true
}

// The parts FuzzMutatedSignature mutates.
const (
	mutKeyPayload = iota
	mutKeySig
	mutKeylessPayload
	mutKeylessSig
	mutKeylessCert
	mutKeylessSET
	mutKeylessBody
	mutKeylessTime
	mutUntrustedChain // a leaf of a CA outside the trusted root, with its chain
	mutBundleKeyPayload
	mutBundleKeySig
	mutBundlePayload
	mutBundleSig
	mutBundleCert
	mutBundleBody
	mutBundleSET
	mutBundleTime
	mutParts
)

// FuzzMutatedSignature: a valid signature (key or keyless, legacy .sig
// layer or sigstore bundle) with one mutated part (payload, signature,
// certificate, chain, transparency-log body, SET or log time) never yields
// verified. Every input starts from material that verifies unmutated (checked
// in the setup), and setup makes no network call.
func FuzzMutatedSignature(f *testing.F) {
	k := newTestKey(f, "ecdsa-p256")
	vs := newVirtualSigstore(f)
	d, err := name.NewDigest("registry.example/app@sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	if err != nil {
		f.Fatal(err)
	}
	keyPol := policyFor(f, keysYAML("", 0, false, k))
	keylessPol := policyFor(f, keylessYAML(vs.rootPath, ident, ""))
	v, err := New(Options{})
	if err != nil {
		f.Fatal(err)
	}
	stmt := cosignStatement(f, d, "https://sigstore.dev/cosign/sign/v1")
	keyLegacy := splitLegacy(f, keySig(f, k, simplePayload(f, d)))
	keylessLegacy := splitLegacy(f, vs.keylessSig(f, ident, issuer, simplePayload(f, d), true))
	foreign := newSANCA(f, vs) // its CA is not in vs's trusted root; its log entries are
	leaf, leafKey := foreign.leaf(f, nil, []string{ident}, issuer)
	untrusted := splitLegacy(f, foreign.legacySig(f, leaf, leafKey, simplePayload(f, d)))
	parseBundle := func(raw []byte) *protobundle.Bundle {
		var b sgbundle.Bundle
		if err := b.UnmarshalJSON(raw); err != nil {
			f.Fatal(err)
		}
		return b.Bundle
	}
	keyBundlePB := parseBundle(keyBundle(f, k, stmt))
	keylessBundlePB := parseBundle(vs.keylessBundle(f, ident, issuer, stmt))

	verifiedLegacy := func(p *policy.Policy, s legacySig) bool {
		tl := newTally(p)
		v.checkLegacy(context.Background(), p, s, d, tl)
		return tl.met()
	}
	verifiedBundle := func(p *policy.Policy, pb *protobundle.Bundle) bool {
		raw, err := protojson.Marshal(pb)
		if err != nil {
			return false
		}
		var b sgbundle.Bundle
		if err := b.UnmarshalJSON(raw); err != nil {
			return false
		}
		tl := newTally(p)
		v.checkBundle(context.Background(), p, sigBundle{b: &b}, d, tl)
		return tl.met()
	}
	// The unmutated material verifies (except the foreign CA's), so that a
	// mutation that fails to verify means something.
	for name, ok := range map[string]bool{
		"key layer":      verifiedLegacy(keyPol, keyLegacy.layer()),
		"keyless layer":  verifiedLegacy(keylessPol, keylessLegacy.layer()),
		"key bundle":     verifiedBundle(keyPol, keyBundlePB),
		"keyless bundle": verifiedBundle(keylessPol, keylessBundlePB),
		"foreign CA":     !verifiedLegacy(keylessPol, untrusted.layer()),
	} {
		if !ok {
			f.Fatalf("setup: %s does not give the expected verdict unmutated", name)
		}
	}

	for part := range uint8(mutParts) {
		f.Add(part, uint32(0), byte(1))
		f.Add(part, uint32(37), byte(0x80))
		f.Add(part, uint32(200), byte(0))
	}
	f.Fuzz(func(t *testing.T, part uint8, off uint32, xor byte) {
		part %= mutParts
		var changed bool
		legacy := func(base legacyParts, field func(*legacyParts) *[]byte) (legacyParts, bool) {
			p := base
			p.chain = append([][]byte(nil), base.chain...)
			fp := field(&p)
			*fp, changed = mutateBytes(*fp, off, xor)
			return p, changed
		}
		bundle := func(base *protobundle.Bundle, field func(*protobundle.Bundle) *[]byte) (*protobundle.Bundle, bool) {
			pb := proto.Clone(base).(*protobundle.Bundle)
			fp := field(pb)
			*fp, changed = mutateBytes(*fp, off, xor)
			return pb, changed
		}
		var verified bool
		switch part {
		case mutKeyPayload, mutKeySig:
			p, ok := legacy(keyLegacy, func(p *legacyParts) *[]byte {
				if part == mutKeyPayload {
					return &p.payload
				}
				return &p.sig
			})
			if !ok {
				return
			}
			verified = verifiedLegacy(keyPol, p.layer())
		case mutKeylessPayload, mutKeylessSig, mutKeylessCert, mutKeylessSET, mutKeylessBody:
			p, ok := legacy(keylessLegacy, func(p *legacyParts) *[]byte {
				return map[uint8]*[]byte{mutKeylessPayload: &p.payload, mutKeylessSig: &p.sig, mutKeylessCert: &p.cert,
					mutKeylessSET: &p.set, mutKeylessBody: &p.body}[part]
			})
			if !ok {
				return
			}
			verified = verifiedLegacy(keylessPol, p.layer())
		case mutKeylessTime:
			p := keylessLegacy
			if xor == 0 {
				return
			}
			p.at ^= int64(xor) << (off % 56)
			verified = verifiedLegacy(keylessPol, p.layer())
		case mutUntrustedChain:
			p, ok := legacy(untrusted, func(p *legacyParts) *[]byte { return &p.chain[int(off>>8)%len(p.chain)] })
			if !ok {
				return
			}
			verified = verifiedLegacy(keylessPol, p.layer())
		case mutBundleKeyPayload, mutBundleKeySig:
			pb, ok := bundle(keyBundlePB, func(pb *protobundle.Bundle) *[]byte {
				env := pb.GetDsseEnvelope()
				if part == mutBundleKeyPayload {
					return &env.Payload
				}
				return &env.Signatures[0].Sig
			})
			if !ok {
				return
			}
			verified = verifiedBundle(keyPol, pb)
		case mutBundlePayload, mutBundleSig, mutBundleCert, mutBundleBody, mutBundleSET:
			pb, ok := bundle(keylessBundlePB, func(pb *protobundle.Bundle) *[]byte {
				env, vm := pb.GetDsseEnvelope(), pb.GetVerificationMaterial()
				e := vm.GetTlogEntries()[0]
				switch part {
				case mutBundlePayload:
					return &env.Payload
				case mutBundleSig:
					return &env.Signatures[0].Sig
				case mutBundleCert:
					return &vm.GetCertificate().RawBytes
				case mutBundleBody:
					return &e.CanonicalizedBody
				default:
					return &e.InclusionPromise.SignedEntryTimestamp
				}
			})
			if !ok {
				return
			}
			verified = verifiedBundle(keylessPol, pb)
		case mutBundleTime:
			if xor == 0 {
				return
			}
			pb := proto.Clone(keylessBundlePB).(*protobundle.Bundle)
			pb.GetVerificationMaterial().GetTlogEntries()[0].IntegratedTime ^= int64(xor) << (off % 56)
			verified = verifiedBundle(keylessPol, pb)
		}
		if verified {
			t.Fatalf("part %d mutated at %d (xor %#x) still verified", part, off, xor)
		}
	})
}
