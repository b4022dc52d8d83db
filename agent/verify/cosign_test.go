package verify

import (
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"bytes"
	"encoding/base64"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/test/harness"
	"github.com/sigstore/cosign/v2/pkg/cosign"
	"github.com/sigstore/cosign/v2/pkg/oci/mutate"
	ociremote "github.com/sigstore/cosign/v2/pkg/oci/remote"
	"github.com/sigstore/cosign/v2/pkg/oci/static"
)

// Signatures written by cosign's own library (AttachSignatureToEntity +
// WriteSignatures), as `cosign sign` does.
func TestCosignLibrarySignature(t *testing.T) {
	t.Parallel()
	reg := newTestRegistry(t, true)
	k := newTestKey(t, "ecdsa-p256")
	d := reg.pushImage(t, "cosignlib")
	pl := simplePayload(t, d)
	raw, err := k.sv.SignMessage(bytes.NewReader(pl))
	if err != nil {
		t.Fatal(err)
	}
	sig, err := static.NewSignature(pl, base64.StdEncoding.EncodeToString(raw))
	if err != nil {
		t.Fatal(err)
	}
	ropts := ociremote.WithRemoteOptions(remote.WithContext(t.Context()))
	se, err := ociremote.SignedEntity(d, ropts)
	if err != nil {
		t.Fatal(err)
	}
	se, err = mutate.AttachSignatureToEntity(se, sig)
	if err != nil {
		t.Fatal(err)
	}
	if err := ociremote.WriteSignatures(d.Repository, se, ropts); err != nil {
		t.Fatal(err)
	}
	res := newTestVerifier(t, reg, nil).Verify(t.Context(), policyFor(t, keysYAML("", 0, false, k)), d.Context().Name(), d.DigestStr())
	if res.Verdict != verdict.Verified || len(res.Signers) != 1 || res.Signers[0] != k.id {
		t.Fatalf("got %s/%s %v (%s)", res.Verdict, res.Reason, res.Signers, res.Detail)
	}
}

// The cosign CLI v2.6 signing (legacy .sig and --new-bundle-format) against
// the in-process registry; pinwarden must verify both.
func TestCosignCLI(t *testing.T) {
	t.Parallel()
	bin := harness.RequireBinary(t, "cosign")
	dir := t.TempDir()
	run := func(args ...string) {
		t.Helper()
		cmd := exec.CommandContext(t.Context(), bin, args...)
		cmd.Dir = dir
		cmd.Env = []string{"HOME=" + dir, "TUF_ROOT=" + filepath.Join(dir, "tuf"), "COSIGN_PASSWORD=pinwarden", "PATH=/usr/bin:/bin"}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("cosign %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("generate-key-pair")
	reg := newTestRegistry(t, true)
	legacy := reg.pushImage(t, "cli/legacy")
	bundled := reg.pushImage(t, "cli/bundle")
	run("sign", "--key", "cosign.key", "--tlog-upload=false", "--allow-http-registry", "-y", legacy.String())
	run("sign", "--key", "cosign.key", "--tlog-upload=false", "--new-bundle-format", "--allow-http-registry", "-y", bundled.String())

	p := policyFor(t, "policies:\n- name: test\n  images: [\"**\"]\n  keys: ["+filepath.Join(dir, "cosign.pub")+"]\n")
	ct := &countingTransport{next: http.DefaultTransport}
	v := newTestVerifier(t, reg, func(o *Options) { o.Transport = ct })
	for _, d := range []struct{ repo, digest string }{{legacy.Context().Name(), legacy.DigestStr()}, {bundled.Context().Name(), bundled.DigestStr()}} {
		res := v.Verify(t.Context(), p, d.repo, d.digest)
		if res.Verdict != verdict.Verified {
			t.Errorf("%s: got %s/%s (%s)", d.repo, res.Verdict, res.Reason, res.Detail)
		}
	}
	// The CLI's legacy payload is the one knownPayload rebuilds: its
	// layer is never fetched.
	if ct.sawPrefix("/v2/cli/legacy/blobs/") {
		t.Errorf("the legacy signature layer was fetched; want it rebuilt (requests: %v)", ct.paths)
	}
	// The legacy signature of one image must not verify the other.
	res := v.Verify(t.Context(), p, legacy.Context().Name(), bundled.DigestStr())
	if res.Verdict == verdict.Verified {
		t.Errorf("cross-image verification succeeded: %+v", res)
	}
}

// The CheckOpts handed to cosign always carry the claim verifier, explicit
// trust and, for keyless, an identity and a required tlog.
func TestCheckOptsFootguns(t *testing.T) {
	t.Parallel()
	vs := newVirtualSigstore(t)
	k := newTestKey(t, "ed25519")
	kp := policyFor(t, keysYAML("", 0, false, k))
	lp := policyFor(t, keylessYAML(vs.rootPath, "", `ci@example\.com`))
	ko := keyOpts(kp, kp.Keys[0])
	lo := keylessOpts(lp, lp.Identities[0])
	for name, co := range map[string]*cosign.CheckOpts{"key": ko, "keyless": lo} {
		if co.ClaimVerifier == nil {
			t.Errorf("%s: no ClaimVerifier", name)
		}
		if co.TrustedMaterial == nil || co.RekorPubKeys == nil || co.CTLogPubKeys == nil {
			t.Errorf("%s: trust left to cosign's environment lookup", name)
		}
		if !co.Offline {
			t.Errorf("%s: online lookups allowed", name)
		}
	}
	if len(lo.Identities) != 1 || lo.IgnoreTlog || lo.SigVerifier != nil {
		t.Errorf("keyless opts: %+v", lo)
	}
	if re := lo.Identities[0].SubjectRegExp; !strings.HasPrefix(re, "^") || !strings.HasSuffix(re, "$") {
		t.Errorf("identity regexp %q not anchored", re)
	}
	// A hand-built policy without identities or trust never reaches cosign.
	bad := *lp
	bad.Identities = []policy.Identity{{Issuer: "x", SubjectRegExp: "unanchored"}}
	if err := checkPolicy(&bad); err == nil {
		t.Error("checkPolicy accepted an unanchored identity")
	}
	bad = *lp
	bad.RequireTlog = false
	if err := checkPolicy(&bad); err == nil {
		t.Error("checkPolicy accepted keyless without tlog")
	}
	bad = *kp
	bad.Threshold = 0
	if err := checkPolicy(&bad); err == nil {
		t.Error("checkPolicy accepted threshold 0")
	}
	reg := newTestRegistry(t, true)
	d := reg.pushImage(t, "footgun")
	res := newTestVerifier(t, reg, nil).Verify(t.Context(), &bad, d.Context().Name(), d.DigestStr())
	if res.Verdict == verdict.Verified {
		t.Error("verified under an invalid policy")
	}
}
