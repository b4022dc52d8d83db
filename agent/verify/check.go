package verify

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/sigstore/cosign/v2/pkg/cosign"
	"github.com/sigstore/cosign/v2/pkg/oci"
	ctypes "github.com/sigstore/cosign/v2/pkg/types"
	protobundle "github.com/sigstore/protobuf-specs/gen/pb-go/bundle/v1"
	protocommon "github.com/sigstore/protobuf-specs/gen/pb-go/common/v1"
	sgbundle "github.com/sigstore/sigstore-go/pkg/bundle"
	"github.com/sigstore/sigstore-go/pkg/fulcio/certificate"
	"github.com/sigstore/sigstore-go/pkg/root"
	sgverify "github.com/sigstore/sigstore-go/pkg/verify"
	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"github.com/sigstore/sigstore/pkg/tuf"
)

// simpleSigningType is the critical.type of cosign's image signature payloads.
const simpleSigningType = "cosign container image signature"

// claimVerifier wraps cosign.SimpleClaimVerifier (always set: without it the
// signed docker-manifest-digest is never compared) and types its failures.
func claimVerifier(sig oci.Signature, h v1.Hash, ann map[string]any) error {
	p, err := sig.Payload()
	if err != nil {
		return failure(verdict.ReasonInvalidSignature, "read payload: %w", err)
	}
	var ss struct {
		Critical struct {
			Type string `json:"type"`
		} `json:"critical"`
	}
	if err := json.Unmarshal(p, &ss); err != nil {
		return failure(verdict.ReasonInvalidSignature, "payload is not a simple-signing document: %w", err)
	}
	if ss.Critical.Type != simpleSigningType {
		return failure(verdict.ReasonInvalidSignature, "payload type %q is not %q", ss.Critical.Type, simpleSigningType)
	}
	if err := cosign.SimpleClaimVerifier(sig, h, ann); err != nil {
		return &FailureError{Reason: verdict.ReasonDigestMismatch, Err: err}
	}
	return nil
}

// logKeys builds cosign's Rekor/CT key sets from the trusted root, never from
// the environment; empty (not nil) when there is no root.
func logKeys(logs map[string]*root.TransparencyLog) *cosign.TrustedTransparencyLogPubKeys {
	k := &cosign.TrustedTransparencyLogPubKeys{Keys: map[string]cosign.TransparencyLogPubKey{}}
	for id, l := range logs {
		k.Keys[id] = cosign.TransparencyLogPubKey{PubKey: l.PublicKey, Status: tuf.Active}
	}
	return k
}

func rootLogs(p *policy.Policy) (rekor, ct map[string]*root.TransparencyLog) {
	if p.TrustedRoot == nil {
		return nil, nil
	}
	return p.TrustedRoot.RekorLogs(), p.TrustedRoot.CTLogs()
}

// keyOpts are the CheckOpts for one key: every trust input explicit.
func keyOpts(p *policy.Policy, k policy.Key) *cosign.CheckOpts {
	rekor, ct := rootLogs(p)
	co := &cosign.CheckOpts{
		SigVerifier:   k.Verifier,
		ClaimVerifier: claimVerifier,
		IgnoreTlog:    !p.RequireTlog,
		IgnoreSCT:     true,
		Offline:       true,
		RekorPubKeys:  logKeys(rekor),
		CTLogPubKeys:  logKeys(ct),
	}
	if p.TrustedRoot != nil {
		co.TrustedMaterial = p.TrustedRoot
	} else {
		co.TrustedMaterial = &root.BaseTrustedMaterial{}
	}
	return co
}

// keylessOpts are the CheckOpts for one keyless identity. Identities is never
// empty and the tlog is always required (checkPolicy asserted both).
func keylessOpts(p *policy.Policy, id policy.Identity) *cosign.CheckOpts {
	rekor, ct := rootLogs(p)
	return &cosign.CheckOpts{
		ClaimVerifier:   claimVerifier,
		TrustedMaterial: p.TrustedRoot,
		Identities:      []cosign.Identity{{Issuer: id.Issuer, Subject: id.Subject, SubjectRegExp: id.SubjectRegExp}},
		// SCTs are required whenever the trusted root lists CT logs.
		IgnoreSCT:    len(ct) == 0,
		IgnoreTlog:   false,
		Offline:      true,
		RekorPubKeys: logKeys(rekor),
		CTLogPubKeys: logKeys(ct),
	}
}

// keySigner names the actual signer behind a key signature.
func keySigner(k policy.Key) string { return "key " + k.ID }

// certSigner names the actual signer behind a certificate: its OIDC issuer
// and all its SANs, so that one certificate counts as one signer however
// many identities it satisfies.
func certSigner(cert *x509.Certificate) string {
	ext, _ := certificate.ParseExtensions(cert.Extensions)
	sans := cryptoutils.GetSubjectAlternateNames(cert)
	slices.Sort(sans)
	return "cert " + ext.Issuer + "\x00" + strings.Join(sans, "\x00")
}

func (v *Verifier) checkLegacy(ctx context.Context, p *policy.Policy, s legacySig, d name.Digest, t *tally) {
	t.seen++
	if s.bad != nil {
		t.fail(s.bad)
		return
	}
	h, err := v1.NewHash(d.DigestStr())
	if err != nil {
		t.fail(failure(verdict.ReasonInvalidSignature, "digest: %w", err))
		return
	}
	for i, k := range p.Keys {
		if t.has(keySigner(k), i) {
			continue
		}
		if _, err := cosign.VerifyImageSignature(ctx, s.sig, h, keyOpts(p, k)); err != nil {
			t.fail(diagnoseKey(p, k, s.sig, err))
			continue
		}
		t.ok(keySigner(k), i, k.ID)
	}
	if len(p.Identities) == 0 {
		return
	}
	cert, err := s.sig.Cert()
	if err != nil || cert == nil {
		t.fail(failure(verdict.ReasonInvalidSignature, "no usable certificate on signature (want %s)", p.Identities[0]))
		return
	}
	who := certSigner(cert)
	for j, id := range p.Identities {
		idx := len(p.Keys) + j
		if t.has(who, idx) {
			continue
		}
		label, fe := identityMatches(id, cert)
		if fe != nil {
			t.fail(fe)
			continue
		}
		_, err := cosign.VerifyImageSignature(ctx, s.sig, h, keylessOpts(p, id))
		if err == nil {
			err = chainValidAtLogTime(s.sig, p.TrustedRoot)
		}
		if err != nil {
			t.fail(diagnoseKeyless(id, s.sig, err))
			continue
		}
		t.ok(who, idx, label)
	}
}

// diagnoseKey names why a key did not verify a signature.
func diagnoseKey(p *policy.Policy, k policy.Key, sig oci.Signature, err error) *FailureError {
	var fe *FailureError
	if errors.As(err, &fe) {
		return fe
	}
	raw, serr := sig.Signature()
	payload, perr := sig.Payload()
	if serr != nil || perr != nil {
		return failure(verdict.ReasonInvalidSignature, "malformed signature: %w", errors.Join(serr, perr))
	}
	if verr := k.Verifier.VerifySignature(bytes.NewReader(raw), bytes.NewReader(payload)); verr != nil {
		return failure(verdict.ReasonInvalidSignature, "signature does not verify with key %s", k.ID)
	}
	if p.RequireTlog {
		if b, berr := sig.Bundle(); berr == nil && b == nil {
			return failure(verdict.ReasonTlogMissing, "signature by key %s has no transparency-log entry", k.ID)
		}
	}
	return &FailureError{Reason: verdict.ReasonInvalidSignature, Err: fmt.Errorf("key %s: %w", k.ID, err)}
}

// diagnoseKeyless names why a keyless identity did not verify a signature.
func diagnoseKeyless(id policy.Identity, sig oci.Signature, err error) *FailureError {
	var fe *FailureError
	if errors.As(err, &fe) {
		return fe
	}
	cert, cerr := sig.Cert()
	if cerr != nil || cert == nil {
		return failure(verdict.ReasonInvalidSignature, "no usable certificate on signature (want %s)", id)
	}
	if _, ferr := identityMatches(id, cert); ferr != nil {
		return ferr
	}
	if b, berr := sig.Bundle(); berr == nil && b == nil {
		return failure(verdict.ReasonTlogMissing, "keyless signature has no transparency-log entry")
	}
	return &FailureError{Reason: verdict.ReasonInvalidSignature, Err: fmt.Errorf("identity %s: %w", id, err)}
}

// identityMatches checks a certificate against a keyless identity: the
// OIDC issuer exactly, the subject against every SAN of the certificate (as
// cosign does; sigstore-go looks at the first SAN only). It returns the
// label of the signer: the issuer and the SAN that matched.
func identityMatches(id policy.Identity, cert *x509.Certificate) (string, *FailureError) {
	ext, err := certificate.ParseExtensions(cert.Extensions)
	if err != nil {
		return "", failure(verdict.ReasonInvalidSignature, "certificate: %w", err)
	}
	sans := cryptoutils.GetSubjectAlternateNames(cert)
	for _, san := range sans {
		if id.Matches(ext.Issuer, san) {
			return ext.Issuer + " " + san, nil
		}
	}
	return "", failure(verdict.ReasonIdentityMismatch, "certificate identity %q %q does not match %s", ext.Issuer, sans, id)
}

// chainValidAtLogTime re-verifies the leaf's chain at the transparency-log
// integrated time, so that every certificate of the chain (intermediates
// included) must have been valid when the signature was logged
// (GHSA-wfqv-66vq-46rm: cosign v2 checks the chain at the leaf's NotBefore).
func chainValidAtLogTime(sig oci.Signature, tm root.TrustedMaterial) error {
	b, err := sig.Bundle()
	if err != nil || b == nil {
		return failure(verdict.ReasonTlogMissing, "keyless signature has no transparency-log entry")
	}
	cert, err := sig.Cert()
	if err != nil || cert == nil {
		return failure(verdict.ReasonInvalidSignature, "no certificate on keyless signature")
	}
	var unhandled []asn1.ObjectIdentifier
	for _, oid := range cert.UnhandledCriticalExtensions {
		if !oid.Equal(cryptoutils.SANOID) {
			unhandled = append(unhandled, oid)
		}
	}
	cert.UnhandledCriticalExtensions = unhandled
	at := time.Unix(b.Payload.IntegratedTime, 0)
	if _, err := sgverify.VerifyLeafCertificate(at, cert, tm); err != nil {
		return failure(verdict.ReasonInvalidSignature, "certificate chain not valid at log time %s: %w", at.UTC().Format(time.RFC3339), err)
	}
	return nil
}

func (v *Verifier) checkBundle(ctx context.Context, p *policy.Policy, sb sigBundle, d name.Digest, t *tally) {
	t.seen++
	if sb.bad != nil {
		t.fail(sb.bad)
		return
	}
	want, err := hex.DecodeString(d.DigestStr()[len("sha256:"):])
	if err != nil {
		t.fail(failure(verdict.ReasonInvalidSignature, "digest: %w", err))
		return
	}
	mismatch := bundleDigestMismatch(sb.b, d.DigestStr()[len("sha256:"):], want)
	check := func(co *cosign.CheckOpts) *FailureError {
		// First the signature, identity and tlog, ignoring the artifact, so
		// that a digest mismatch is only reported for a genuine signature...
		if _, err := cosign.VerifyNewBundle(ctx, co, sgverify.WithoutArtifactUnsafe(), sb.b); err != nil {
			if p.RequireTlog && len(sb.b.GetVerificationMaterial().GetTlogEntries()) == 0 {
				return failure(verdict.ReasonTlogMissing, "bundle has no transparency-log entry: %w", err)
			}
			return failure(verdict.ReasonInvalidSignature, "bundle: %w", err)
		}
		if mismatch != nil {
			return mismatch
		}
		// ...then again bound to the digest, by sigstore-go itself.
		if _, err := cosign.VerifyNewBundle(ctx, co, sgverify.WithArtifactDigest("sha256", want), sb.b); err != nil {
			return failure(verdict.ReasonDigestMismatch, "bundle: %w", err)
		}
		return nil
	}
	for i, k := range p.Keys {
		if t.has(keySigner(k), i) {
			continue
		}
		if fe := check(keyOpts(p, k)); fe != nil {
			t.fail(fe)
			continue
		}
		t.ok(keySigner(k), i, k.ID)
	}
	if len(p.Identities) == 0 {
		return
	}
	vc, err := sb.b.VerificationContent()
	if err != nil || vc.Certificate() == nil {
		t.fail(failure(verdict.ReasonInvalidSignature, "bundle has no certificate (want %s)", p.Identities[0]))
		return
	}
	cert := vc.Certificate()
	who := certSigner(cert)
	for j, id := range p.Identities {
		idx := len(p.Keys) + j
		if t.has(who, idx) {
			continue
		}
		// The identity is matched here, on every SAN, exactly as in the
		// legacy path; sigstore-go then checks the issuer, the chain, the
		// log entry and the signature (bundleOpts).
		label, fe := identityMatches(id, cert)
		if fe != nil {
			t.fail(fe)
			continue
		}
		if fe := check(keylessBundleOpts(p, id)); fe != nil {
			t.fail(fe)
			continue
		}
		t.ok(who, idx, label)
	}
}

// keylessBundleOpts are keylessOpts for sigstore-go, which compares the
// subject with the certificate's first SAN only: the subject matcher
// accepts any SAN, because identityMatches already required one SAN to
// match id. The issuer is still compared exactly.
func keylessBundleOpts(p *policy.Policy, id policy.Identity) *cosign.CheckOpts {
	co := keylessOpts(p, id)
	co.Identities = []cosign.Identity{{Issuer: id.Issuer, SubjectRegExp: "^.*$"}}
	return co
}

// bundleDigestMismatch checks what the bundle says it signed: a cosign
// signing statement (in-toto, predicate https://sigstore.dev/cosign/sign/v1)
// naming the digest, or a message signature over the digest.
func bundleDigestMismatch(b *sgbundle.Bundle, wantHex string, want []byte) *FailureError {
	switch c := b.GetContent().(type) {
	case *protobundle.Bundle_DsseEnvelope:
		env := c.DsseEnvelope
		if env.GetPayloadType() != "application/vnd.in-toto+json" {
			return failure(verdict.ReasonInvalidSignature, "DSSE payload type %q is not in-toto", env.GetPayloadType())
		}
		var st struct {
			PredicateType string `json:"predicateType"`
			Subject       []struct {
				Digest map[string]string `json:"digest"`
			} `json:"subject"`
		}
		if err := json.Unmarshal(env.GetPayload(), &st); err != nil {
			return failure(verdict.ReasonInvalidSignature, "DSSE payload: %w", err)
		}
		if st.PredicateType != ctypes.CosignSignPredicateType {
			return failure(verdict.ReasonInvalidSignature, "bundle predicate %q is not a cosign signature", st.PredicateType)
		}
		for _, s := range st.Subject {
			if s.Digest["sha256"] == wantHex {
				return nil
			}
		}
		return failure(verdict.ReasonDigestMismatch, "bundle statement does not name sha256:%s", wantHex)
	case *protobundle.Bundle_MessageSignature:
		md := c.MessageSignature.GetMessageDigest()
		if md == nil {
			return failure(verdict.ReasonInvalidSignature, "message signature without digest")
		}
		if md.GetAlgorithm() != protocommon.HashAlgorithm_SHA2_256 || !bytes.Equal(md.GetDigest(), want) {
			return failure(verdict.ReasonDigestMismatch, "bundle message digest is not sha256:%s", wantHex)
		}
		return nil
	}
	return failure(verdict.ReasonInvalidSignature, "bundle has no content")
}
