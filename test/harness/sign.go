package harness

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/sigstore/cosign/v2/pkg/oci/mutate"
	ociremote "github.com/sigstore/cosign/v2/pkg/oci/remote"
	"github.com/sigstore/cosign/v2/pkg/oci/static"
	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/sigstore/sigstore/pkg/signature/payload"
)

// Signer is an ECDSA P-256 cosign key pair; its public key is a PEM file
// that a pinwarden policy can name under keys:.
type Signer struct {
	sv      signature.SignerVerifier
	PubPath string
}

// NewSigner generates a key pair and writes the public key to a PEM file
// under t.TempDir().
func NewSigner(t testing.TB) *Signer {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("generate key: %v", err)
	}
	sv, err := signature.LoadSignerVerifier(priv, crypto.SHA256)
	if err != nil {
		t.Fatalf("signer: %v", err)
	}
	pem, err := cryptoutils.MarshalPublicKeyToPEM(priv.Public())
	if err != nil {
		t.Fatalf("public key: %v", err)
	}
	p := filepath.Join(t.TempDir(), "cosign.pub")
	if err := os.WriteFile(p, pem, 0o600); err != nil {
		t.Fatalf("write public key: %v", err)
	}
	return &Signer{sv: sv, PubPath: p}
}

// Sign signs repo@digest with the cosign library the way `cosign sign --key`
// does (a simple-signing payload in a legacy .sig manifest) and pushes the
// signature to the image's repository (plain HTTP allowed).
func (s *Signer) Sign(t testing.TB, repo, digest string) {
	t.Helper()
	d, err := name.NewDigest(repo+"@"+digest, name.Insecure)
	if err != nil {
		t.Fatalf("parse %s@%s: %v", repo, digest, err)
	}
	if err := SignDigest(t.Context(), s.sv, d); err != nil {
		t.Fatal(err)
	}
}

// SignOptions vary the payload Signer.SignWith signs.
type SignOptions struct {
	// As is the payload's docker-reference (default: the repository the
	// signature is pushed to): an image signed under the name users pull
	// it by, and pushed through another name of the same registry.
	As string
	// Annotations go in the payload's "optional" (`cosign sign -a`).
	Annotations map[string]any
}

// SignWith is Sign with the payload varied by o.
func (s *Signer) SignWith(t testing.TB, repo, digest string, o SignOptions) {
	t.Helper()
	d, err := name.NewDigest(repo+"@"+digest, name.Insecure)
	if err != nil {
		t.Fatalf("parse %s@%s: %v", repo, digest, err)
	}
	if err := signDigest(t.Context(), s.sv, d, payload.Cosign{Image: d, ClaimedIdentity: o.As, Annotations: o.Annotations}); err != nil {
		t.Fatal(err)
	}
}

// SignDigest signs d with signer the way `cosign sign --key` does (a
// simple-signing payload in a legacy .sig manifest, no transparency log) and
// pushes the signature to d's repository. Signer.Sign and make demo's
// demotool share it.
func SignDigest(ctx context.Context, signer signature.Signer, d name.Digest) error {
	return signDigest(ctx, signer, d, payload.Cosign{Image: d})
}

func signDigest(ctx context.Context, signer signature.Signer, d name.Digest, p payload.Cosign) error {
	pl, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("payload: %w", err)
	}
	raw, err := signer.SignMessage(bytes.NewReader(pl))
	if err != nil {
		return fmt.Errorf("sign %s: %w", d, err)
	}
	sig, err := static.NewSignature(pl, base64.StdEncoding.EncodeToString(raw))
	if err != nil {
		return fmt.Errorf("signature layer: %w", err)
	}
	ropts := ociremote.WithRemoteOptions(remote.WithContext(ctx))
	se, err := ociremote.SignedEntity(d, ropts)
	if err != nil {
		return fmt.Errorf("signed entity %s: %w", d, err)
	}
	if se, err = mutate.AttachSignatureToEntity(se, sig); err != nil {
		return fmt.Errorf("attach signature: %w", err)
	}
	if err := ociremote.WriteSignatures(d.Repository, se, ropts); err != nil {
		return fmt.Errorf("push signature for %s: %w", d, err)
	}
	return nil
}
