package verify

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"golang.org/x/sync/errgroup"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/sigstore/sigstore/pkg/signature/payload"

	"github.com/pinwarden/pinwarden/agent/verdict"
)

func descriptorOf(b []byte) v1.Descriptor {
	sum := sha256.Sum256(b)
	h, _ := v1.NewHash("sha256:" + hex.EncodeToString(sum[:]))
	return v1.Descriptor{Digest: h, Size: int64(len(b))}
}

// TestKnownPayload: the payload rebuilt is byte for byte the one cosign's
// library writes, and only that payload is rebuilt.
func TestKnownPayload(t *testing.T) {
	const dg = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	for _, repo := range []string{"nginx", "ghcr.io/org/app", "127.0.0.1:5000/team/app", "registry.example:443/a/b/c"} {
		d, err := name.NewDigest(repo + "@" + dg)
		if err != nil {
			t.Fatal(err)
		}
		cosignWrites, err := json.Marshal(payload.Cosign{Image: d})
		if err != nil {
			t.Fatal(err)
		}
		annotated, err := json.Marshal(payload.Cosign{Image: d, Annotations: map[string]any{"a": "b"}})
		if err != nil {
			t.Fatal(err)
		}
		claimed, err := json.Marshal(payload.Cosign{Image: d, ClaimedIdentity: d.Context().Name() + ":v1"})
		if err != nil {
			t.Fatal(err)
		}
		names := []string{"other.example/x", d.Context().Name()}
		if got := knownPayload(descriptorOf(cosignWrites), dg, names); string(got) != string(cosignWrites) {
			t.Errorf("%s: rebuilt %q, cosign writes %q", repo, got, cosignWrites)
		}
		wrongSize := descriptorOf(cosignWrites)
		wrongSize.Size++
		sha512 := descriptorOf(cosignWrites)
		sha512.Digest.Algorithm = "sha512"
		for what, c := range map[string]struct {
			l     v1.Descriptor
			names []string
		}{
			"annotations":       {descriptorOf(annotated), names},
			"a claimed tag":     {descriptorOf(claimed), names},
			"signed as another": {descriptorOf(cosignWrites), []string{"other.example/x"}},
			"another size":      {wrongSize, names},
			"another algorithm": {sha512, names},
		} {
			if got := knownPayload(c.l, dg, c.names); got != nil {
				t.Errorf("%s with %s: rebuilt %q, want a fetch", repo, what, got)
			}
		}
	}
}

// TestKnownPayloadTrustsNothingMore: a rebuilt payload is held to the same
// check as a fetched one. The layer is never uploaded (so it cannot have
// been fetched) and the image verifies; a signature made over another
// payload, under a layer descriptor naming the rebuilt one, does not.
func TestKnownPayloadTrustsNothingMore(t *testing.T) {
	t.Parallel()
	reg := newTestRegistry(t, true)
	k := newTestKey(t, "ecdsa-p256")
	p := policyFor(t, keysYAML("", 0, false, k))
	v := newTestVerifier(t, reg, nil)

	good := reg.pushImage(t, "known/good")
	l := keySig(t, k, simplePayload(t, good))
	l.skip = true
	putSigManifest(t, good.Context(), sigTag(good), []sigLayer{l})
	if res := v.Verify(t.Context(), p, good.Context().Name(), good.DigestStr()); res.Verdict != verdict.Verified {
		t.Fatalf("standard payload, layer never uploaded: %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
	}

	bad := reg.pushImage(t, "known/bad")
	other, err := json.Marshal(payload.Cosign{Image: bad, Annotations: map[string]any{"signed": "something else"}})
	if err != nil {
		t.Fatal(err)
	}
	forged := keySig(t, k, other)          // a real signature, over other
	forged.payload = simplePayload(t, bad) // under the rebuilt payload's descriptor
	forged.skip = true
	putSigManifest(t, bad.Context(), sigTag(bad), []sigLayer{forged})
	if res := v.Verify(t.Context(), p, bad.Context().Name(), bad.DigestStr()); res.Verdict != verdict.Unverified {
		t.Fatalf("signature over another payload: %s/%s (%s), want unverified", res.Verdict, res.Reason, res.Detail)
	}
}

// TestConnectionsReused: connections are kept for as many requests as may
// be in flight per host (16), through the default transport and through a
// hosts.toml endpoint. net/http keeps only 2 idle connections per host by
// default: most responses then closed their connection and the next request
// dialled again (35 connections for 50 images in the bench). Four waves of
// 16 verifications at once: later waves find the first's connections idle.
func TestConnectionsReused(t *testing.T) {
	t.Parallel()
	const inFlight = 16
	reg := newTestRegistry(t, true)
	k := newTestKey(t, "ecdsa-p256")
	p := policyFor(t, keysYAML("", 0, false, k))
	var digests []name.Digest
	const waves = 4
	for i := range waves * inFlight {
		d := reg.pushImage(t, fmt.Sprintf("conn/app-%d", i))
		putSigManifest(t, d.Context(), sigTag(d), []sigLayer{keySig(t, k, simplePayload(t, d))})
		digests = append(digests, d)
	}
	hostsDir := t.TempDir()
	h, port, _ := strings.Cut(reg.host, ":")
	writeTestFile(t, filepath.Join(hostsDir, h+"_"+port+"_", "hosts.toml"), fmt.Sprintf("server = \"http://%s\"\n", reg.host))
	for _, c := range []struct {
		name string
		mod  func(*Options)
	}{
		{"default transport", nil},
		{"hosts.toml endpoint", func(o *Options) { o.Registries.ContainerdHostsDir = hostsDir }},
	} {
		v := newTestVerifier(t, reg, c.mod)
		wave := func(ds []name.Digest) int64 {
			before := reg.conns.Load()
			var g errgroup.Group
			for _, d := range ds {
				g.Go(func() error {
					if res := v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr()); res.Verdict != verdict.Verified {
						return fmt.Errorf("%s: %s/%s (%s)", d, res.Verdict, res.Reason, res.Detail)
					}
					return nil
				})
			}
			if err := g.Wait(); err != nil {
				t.Fatalf("%s: %v", c.name, err)
			}
			return reg.conns.Load() - before
		}
		// All waves together need no more connections than one wave may
		// use at once. A connection goes back to the pool just after its
		// response is read, so a few may still be on their way: some
		// slack (without the pool, each wave after the first dials ~14).
		var per []int64
		total := int64(0)
		for w := range waves {
			per = append(per, wave(digests[w*inFlight:(w+1)*inFlight]))
			total += per[w]
		}
		if total > inFlight+8 {
			t.Errorf("%s: %d waves of %d dialled %v connections, want at most %d in all", c.name, waves, inFlight, per, inFlight+8)
		}
	}
}
