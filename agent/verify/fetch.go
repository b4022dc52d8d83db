package verify

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/pinwarden/pinwarden/agent/verdict"
	cbundle "github.com/sigstore/cosign/v2/pkg/cosign/bundle"
	"github.com/sigstore/cosign/v2/pkg/oci"
	"github.com/sigstore/cosign/v2/pkg/oci/static"
	sgbundle "github.com/sigstore/sigstore-go/pkg/bundle"
	"github.com/sigstore/sigstore/pkg/signature/payload"
)

// Annotation keys of cosign's legacy signature layers.
const (
	annSignature = "dev.cosignproject.cosign/signature"
	annCert      = "dev.sigstore.cosign/certificate"
	annChain     = "dev.sigstore.cosign/chain"
	annBundle    = "dev.sigstore.cosign/bundle"
	annTimestamp = "dev.sigstore.cosign/rfc3161timestamp"
)

// BundleMediaType is the artifactType (and layer media type) of sigstore
// bundles that cosign attaches as OCI referrers.
const BundleMediaType = "application/vnd.dev.sigstore.bundle.v0.3+json"

// legacySig is one signature layer of a .sig manifest, or the reason it is unusable.
type legacySig struct {
	sig oci.Signature
	bad *FailureError
}

// rawManifest is decoded alongside v1.Manifest to catch ambiguous documents.
type rawManifest struct {
	MediaType string          `json:"mediaType"`
	Manifests json.RawMessage `json:"manifests"`
}

// parseImageManifest accepts an OCI or Docker v2 image manifest and nothing
// else: not an index, not a document that is both, not a body whose
// mediaType disagrees with the response's.
func parseImageManifest(desc *remote.Descriptor) (*v1.Manifest, error) {
	switch desc.MediaType {
	case types.OCIManifestSchema1, types.DockerManifestSchema2:
	default:
		return nil, fmt.Errorf("unexpected manifest media type %q", desc.MediaType)
	}
	var raw rawManifest
	if err := json.Unmarshal(desc.Manifest, &raw); err != nil {
		return nil, fmt.Errorf("malformed manifest: %w", err)
	}
	if len(raw.Manifests) > 0 {
		return nil, fmt.Errorf("malformed manifest: both an image manifest and an index")
	}
	if raw.MediaType != "" && types.MediaType(raw.MediaType) != desc.MediaType {
		return nil, fmt.Errorf("malformed manifest: body media type %q disagrees with %q", raw.MediaType, desc.MediaType)
	}
	m, err := v1.ParseManifest(bytes.NewReader(desc.Manifest))
	if err != nil {
		return nil, fmt.Errorf("malformed manifest: %w", err)
	}
	return m, nil
}

// eachLegacy reads the "sha256-<hex>.sig" manifest of d, refuses too many
// or too-large layers before reading any blob, then reads the layers one at
// a time and hands each to check, until check returns true (the threshold
// is met). A layer is dropped before the next is read.
//
// A layer whose payload is the one cosign writes for d under one of
// signedAs is not fetched (knownPayload): one request per signature instead
// of two in the common case.
func (v *Verifier) eachLegacy(ctx context.Context, puller *remote.Puller, d name.Digest, signedAs []string, check func(legacySig) bool) error {
	tag := d.Context().Tag(strings.Replace(d.DigestStr(), ":", "-", 1) + ".sig")
	desc, err := puller.Get(ctx, tag)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return classifyFetch("signature manifest "+tag.String(), err)
	}
	m, err := parseImageManifest(desc)
	if err != nil {
		return &RegistryError{Err: fmt.Errorf("signature manifest %s: %w", tag, err)}
	}
	if len(m.Layers) > v.opts.MaxSignatures {
		return tooLarge("%s has %d signature layers (limit %d)", tag, len(m.Layers), v.opts.MaxSignatures)
	}
	for _, l := range m.Layers {
		if l.Size < 0 || l.Size > v.opts.MaxBlobSize {
			return tooLarge("signature layer %s claims %d bytes (limit %d)", l.Digest, l.Size, v.opts.MaxBlobSize)
		}
	}
	desc = nil // the manifest's bytes are no longer needed
	for _, l := range m.Layers {
		payload := knownPayload(l, d.DigestStr(), signedAs)
		if payload == nil {
			var err error
			if payload, err = v.fetchBlob(ctx, puller, d.Context(), l); err != nil {
				return err
			}
		}
		sig, bad := buildSignature(payload, l.Annotations)
		if check(legacySig{sig: sig, bad: bad}) {
			return nil
		}
	}
	return nil
}

// knownPayload returns the payload of signature layer l without fetching
// it, when it is exactly the one cosign writes for digest signed as one of
// names with no annotations (`cosign sign` without -a): such a payload is
// fully determined by the two, so it is built here and its SHA-256 checked
// against l's digest, the same check a fetched blob must pass. The
// signature over it is then verified as usual, so this trusts nothing more
// than a fetch would. Any other payload (annotations, a claimed tag, another
// signer's format) does not match and is fetched: nil.
func knownPayload(l v1.Descriptor, digest string, names []string) []byte {
	if l.Digest.Algorithm != "sha256" {
		return nil
	}
	for _, n := range names {
		b, err := json.Marshal(payload.SimpleContainerImage{Critical: payload.Critical{
			Identity: payload.Identity{DockerReference: n},
			Image:    payload.Image{DockerManifestDigest: digest},
			Type:     payload.CosignSignatureType,
		}})
		if err != nil || int64(len(b)) != l.Size {
			continue
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) == l.Digest.Hex {
			return b
		}
	}
	return nil
}

// buildSignature turns a layer's payload and annotations into a cosign
// signature; malformed annotations make it an invalid signature.
func buildSignature(payload []byte, ann map[string]string) (oci.Signature, *FailureError) {
	b64, ok := ann[annSignature]
	if !ok || b64 == "" {
		return nil, failure(verdict.ReasonInvalidSignature, "signature layer without %s annotation", annSignature)
	}
	var opts []static.Option
	if c := ann[annCert]; c != "" {
		opts = append(opts, static.WithCertChain([]byte(c), []byte(ann[annChain])))
	}
	if b := ann[annBundle]; b != "" {
		var rb cbundle.RekorBundle
		if err := json.Unmarshal([]byte(b), &rb); err != nil {
			return nil, failure(verdict.ReasonInvalidSignature, "malformed rekor bundle annotation: %w", err)
		}
		if _, ok := rb.Payload.Body.(string); !ok {
			return nil, failure(verdict.ReasonInvalidSignature, "malformed rekor bundle annotation: body is not a string")
		}
		opts = append(opts, static.WithBundle(&rb))
	}
	if ts := ann[annTimestamp]; ts != "" {
		var t cbundle.RFC3161Timestamp
		if err := json.Unmarshal([]byte(ts), &t); err != nil {
			return nil, failure(verdict.ReasonInvalidSignature, "malformed timestamp annotation: %w", err)
		}
		opts = append(opts, static.WithRFC3161Timestamp(&t))
	}
	s, err := static.NewSignature(payload, b64, opts...)
	if err != nil {
		return nil, failure(verdict.ReasonInvalidSignature, "signature layer: %w", err)
	}
	return s, nil
}

// fetchBlob reads one blob whose descriptor was already size-checked, and
// checks that its bytes hash to the descriptor's digest.
func (v *Verifier) fetchBlob(ctx context.Context, puller *remote.Puller, repo name.Repository, l v1.Descriptor) ([]byte, error) {
	if l.Digest.Algorithm != "sha256" {
		return nil, &RegistryError{Err: fmt.Errorf("blob %s: unsupported digest algorithm", l.Digest)}
	}
	if b := budgetOf(ctx); !b.fits(l.Size) {
		return nil, tooLarge("blob %s of %d bytes: one verification read more than %d bytes from registries", l.Digest, l.Size, b.limit)
	}
	layer, err := puller.Layer(ctx, repo.Digest(l.Digest.String()))
	if err != nil {
		return nil, classifyFetch("blob "+l.Digest.String(), err)
	}
	rc, err := layer.Compressed()
	if err != nil {
		return nil, classifyFetch("blob "+l.Digest.String(), err)
	}
	defer rc.Close()
	// One allocation of the size the descriptor gave (already capped), and
	// a probe for one byte more.
	b := make([]byte, l.Size)
	if n, err := io.ReadFull(rc, b); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return nil, &RegistryError{Err: fmt.Errorf("blob %s: %d bytes, descriptor says %d", l.Digest, n, l.Size)}
		}
		return nil, classifyFetch("blob "+l.Digest.String(), err)
	}
	var one [1]byte
	if n, _ := io.ReadFull(rc, one[:]); n > 0 {
		return nil, &RegistryError{Err: fmt.Errorf("blob %s: more bytes than the descriptor's %d", l.Digest, l.Size)}
	}
	sum := sha256.Sum256(b)
	if hex.EncodeToString(sum[:]) != l.Digest.Hex {
		return nil, &RegistryError{Err: fmt.Errorf("blob %s: content does not match its digest", l.Digest)}
	}
	return b, nil
}

// sigBundle is one sigstore bundle referrer, or the reason it is unusable.
type sigBundle struct {
	b   *sgbundle.Bundle
	bad *FailureError
}

// eachBundle lists the referrers of d (Referrers API, or the
// "sha256-<hex>" tag fallback), refuses too many bundle referrers, then
// reads the sigstore bundles among them one at a time and hands each to
// check, until check returns true. A bundle is dropped before the next is
// read.
func (v *Verifier) eachBundle(ctx context.Context, puller *remote.Puller, d name.Digest, check func(sigBundle) bool) error {
	idx, err := remote.Referrers(d, remote.Reuse(puller), remote.WithContext(ctx))
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return classifyFetch("referrers of "+d.String(), err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return classifyFetch("referrers of "+d.String(), err)
	}
	var cands []v1.Descriptor
	for _, m := range im.Manifests {
		if isBundleReferrer(m) {
			cands = append(cands, m)
		}
	}
	if len(cands) > v.opts.MaxReferrers {
		return tooLarge("%s has %d bundle referrers (limit %d)", d, len(cands), v.opts.MaxReferrers)
	}
	idx, im = nil, nil // the index's bytes are no longer needed
	for _, c := range cands {
		sb, err := v.fetchBundle(ctx, puller, d.Context(), c)
		if err != nil {
			return err
		}
		if check(sb) {
			return nil
		}
	}
	return nil
}

// isBundleReferrer picks sigstore bundles out of a referrers list: by
// artifactType, or, for registries that report the config media type
// instead (ggcr's registry does), by cosign's bundle annotation. The layer
// media type is checked again after the manifest is fetched.
func isBundleReferrer(m v1.Descriptor) bool {
	if m.ArtifactType == BundleMediaType {
		return true
	}
	_, cosignBundle := m.Annotations["dev.sigstore.bundle.content"]
	return cosignBundle && (m.ArtifactType == "" || m.ArtifactType == "application/vnd.oci.empty.v1+json")
}

func (v *Verifier) fetchBundle(ctx context.Context, puller *remote.Puller, repo name.Repository, c v1.Descriptor) (sigBundle, error) {
	if c.Size > v.opts.MaxResponseSize {
		return sigBundle{}, tooLarge("bundle manifest %s claims %d bytes", c.Digest, c.Size)
	}
	desc, err := puller.Get(ctx, repo.Digest(c.Digest.String()))
	if err != nil {
		return sigBundle{}, classifyFetch("bundle manifest "+c.Digest.String(), err)
	}
	m, err := parseImageManifest(desc)
	if err != nil {
		return sigBundle{bad: failure(verdict.ReasonInvalidSignature, "bundle manifest %s: %w", c.Digest, err)}, nil
	}
	if len(m.Layers) != 1 {
		return sigBundle{bad: failure(verdict.ReasonInvalidSignature, "bundle manifest %s has %d layers, want 1", c.Digest, len(m.Layers))}, nil
	}
	l := m.Layers[0]
	if l.MediaType != BundleMediaType {
		return sigBundle{bad: failure(verdict.ReasonInvalidSignature, "bundle layer media type %q", l.MediaType)}, nil
	}
	if l.Size < 0 || l.Size > v.opts.MaxBlobSize {
		return sigBundle{}, tooLarge("bundle layer %s claims %d bytes (limit %d)", l.Digest, l.Size, v.opts.MaxBlobSize)
	}
	raw, err := v.fetchBlob(ctx, puller, repo, l)
	if err != nil {
		return sigBundle{}, err
	}
	var b sgbundle.Bundle
	if err := b.UnmarshalJSON(raw); err != nil {
		return sigBundle{bad: failure(verdict.ReasonInvalidSignature, "malformed bundle %s: %w", l.Digest, err)}, nil
	}
	return sigBundle{b: &b}, nil
}
