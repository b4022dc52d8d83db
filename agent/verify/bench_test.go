package verify

import (
	"bytes"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/pinwarden/pinwarden/agent/verdict"
)

// countingTransport counts requests that reach the network, and keeps
// their paths.
type countingTransport struct {
	n    atomic.Int64
	next http.RoundTripper

	mu    sync.Mutex // guards paths
	paths []string
}

// sawPrefix reports whether a request path began with prefix.
func (c *countingTransport) sawPrefix(prefix string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.ContainsFunc(c.paths, func(p string) bool { return strings.HasPrefix(p, prefix) })
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	c.mu.Lock()
	c.paths = append(c.paths, r.URL.Path)
	c.mu.Unlock()
	return c.next.RoundTrip(r)
}

// A cold key-based verification of a legacy-signed image costs 2 registry
// requests (ping, signature manifest); guards
// against regressions such as an extra HEAD or an unconditional referrers call.
func TestRequestsPerColdVerification(t *testing.T) {
	t.Parallel()
	reg := newTestRegistry(t, true)
	d, p := signedImage(t, reg, "count")
	ct := &countingTransport{next: http.DefaultTransport}
	v := newTestVerifier(t, reg, func(o *Options) { o.Transport = ct })
	res := v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr())
	if res.Verdict != verdict.Verified {
		t.Fatalf("got %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
	}
	// ping and signature manifest: the layer's payload is the one cosign
	// writes, rebuilt rather than fetched (knownPayload).
	if n := ct.n.Load(); n != 2 {
		t.Fatalf("%d registry requests for one cold verification, want 2", n)
	}
	t.Logf("registry requests per cold verified verification: %d", ct.n.Load())

	// An unsigned image in another repository: ping, .sig 404, referrers.
	u := reg.pushImage(t, "count/unsigned")
	ct.n.Store(0)
	res = v.Verify(t.Context(), p, u.Context().Name(), u.DigestStr())
	if res.Reason != verdict.ReasonNoSignature {
		t.Fatalf("got %s/%s", res.Verdict, res.Reason)
	}
	t.Logf("registry requests per cold unsigned verification: %d", ct.n.Load())

	// Another unsigned digest of that repository: the registry ping (and
	// token) of the first is reused, so only the .sig and referrers lookups.
	u2 := reg.pushImage(t, "count/unsigned")
	ct.n.Store(0)
	if res = v.Verify(t.Context(), p, u2.Context().Name(), u2.DigestStr()); res.Reason != verdict.ReasonNoSignature {
		t.Fatalf("got %s/%s", res.Verdict, res.Reason)
	}
	if n := ct.n.Load(); n != 2 {
		t.Fatalf("%d registry requests for a second digest of a known repository, want 2 (no ping)", n)
	}
}

// BenchmarkVerifyColdKey: one full cold Verify (new registry client, ping,
// fetch, cosign verification) against the in-process registry.
func BenchmarkVerifyColdKey(b *testing.B) {
	reg := newTestRegistry(b, true)
	k := newTestKey(b, "ecdsa-p256")
	d := reg.pushImage(b, "bench")
	putSigManifest(b, d.Context(), sigTag(d), []sigLayer{keySig(b, k, simplePayload(b, d))})
	p := policyFor(b, keysYAML("", 0, false, k))
	ct := &countingTransport{next: http.DefaultTransport}
	v := newTestVerifier(b, reg, func(o *Options) { o.Transport = ct })
	b.ResetTimer()
	for b.Loop() {
		if res := v.Verify(b.Context(), p, d.Context().Name(), d.DigestStr()); res.Verdict != verdict.Verified {
			b.Fatalf("got %s/%s", res.Verdict, res.Reason)
		}
	}
	b.ReportMetric(float64(ct.n.Load())/float64(b.N), "requests/op")
}

// BenchmarkCheckLegacyKey: the CPU of verifying one fetched legacy signature
// with one key (cosign VerifyImageSignature + claim check), no network.
// Guards the <= 100us per key-based verification budget.
func BenchmarkCheckLegacyKey(b *testing.B) {
	for _, kind := range []string{"ecdsa-p256", "ed25519", "rsa"} {
		b.Run(kind, func(b *testing.B) {
			reg := newTestRegistry(b, true)
			k := newTestKey(b, kind)
			d := reg.pushImage(b, "bench")
			l := keySig(b, k, simplePayload(b, d))
			sig, bad := buildSignature(l.payload, l.ann)
			if bad != nil {
				b.Fatal(bad)
			}
			p := policyFor(b, keysYAML("", 0, false, k))
			v := newTestVerifier(b, reg, nil)
			raw, _ := sig.Signature()
			b.Run("primitive-only", func(b *testing.B) {
				for b.Loop() {
					if err := k.sv.VerifySignature(bytes.NewReader(raw), bytes.NewReader(l.payload)); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("checkLegacy", func(b *testing.B) {
				for b.Loop() {
					t := newTally(p)
					v.checkLegacy(b.Context(), p, legacySig{sig: sig}, d, t)
					if !t.met() {
						b.Fatal("not verified")
					}
				}
			})
		})
	}
}
