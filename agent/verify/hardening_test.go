package verify

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"runtime/metrics"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/pinwarden/pinwarden/agent/verdict"
	sgbundle "github.com/sigstore/sigstore-go/pkg/bundle"
)

// Tests for the holes of issue 10 that live in agent/verify. The heap tests
// are not parallel: they read process-wide heap figures.

// peakHeap runs f and returns the highest heap in use (live objects and
// garbage not yet collected) seen above the level before f, sampled every
// 100µs by another goroutine.
func peakHeap(t testing.TB, f func()) uint64 {
	t.Helper()
	runtime.GC()
	read := func() uint64 {
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		metrics.Read(s)
		return s[0].Value.Uint64()
	}
	base := read()
	var peak atomic.Uint64
	observe := func() {
		if h := read(); h > peak.Load() {
			peak.Store(h)
		}
	}
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		tk := time.NewTicker(100 * time.Microsecond)
		defer tk.Stop()
		for {
			select {
			case <-done:
				return
			case <-tk.C:
				observe()
			}
		}
	}()
	f()
	observe()
	close(done)
	<-stopped
	if p := peak.Load(); p > base {
		return p - base
	}
	return 0
}

// Hole 1: a .sig manifest with 100 layers of 4 MiB each (every one within
// the per-layer limits) is checked one layer at a time within a byte budget,
// and ends as a definitive (cacheable) unverified/too-large.
func TestSignatureLayersStreamedWithinBudget(t *testing.T) {
	reg := newTestRegistry(t, true)
	d := reg.pushImage(t, "hostile/sig")
	k := newTestKey(t, "ecdsa-p256")
	big := bytes.Repeat([]byte("x"), 4<<20)
	l := sigLayer{payload: big, ann: map[string]string{annSignature: "AAAA"}}
	ls := make([]sigLayer, 100)
	for i := range ls {
		ls[i] = l
	}
	putSigManifest(t, d.Context(), sigTag(d), ls)
	v := newTestVerifier(t, reg, nil)
	p := policyFor(t, keysYAML("", 0, false, k))
	var res verdict.Result
	peak := peakHeap(t, func() { res = v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr()) })
	t.Logf("peak heap of one verification of 100 x 4 MiB signature layers: %.1f MiB (%s/%s)", float64(peak)/(1<<20), res.Verdict, res.Reason)
	if res.Verdict != verdict.Unverified || res.Reason != verdict.ReasonTooLarge || !res.Definitive() {
		t.Fatalf("got %s/%s (%s), want a definitive unverified/too-large", res.Verdict, res.Reason, res.Detail)
	}
	if peak > 48<<20 {
		t.Fatalf("peak heap %d MiB: signature layers are held together", peak>>20)
	}
}

// paddedStatement is a cosign signing statement for d padded to about n bytes.
func paddedStatement(t testing.TB, d name.Digest, n int) []byte {
	t.Helper()
	st := map[string]any{
		"_type":         "https://in-toto.io/Statement/v1",
		"subject":       []any{map[string]any{"name": d.Context().Name(), "digest": map[string]string{"sha256": d.DigestStr()[len("sha256:"):]}}},
		"predicateType": "https://sigstore.dev/cosign/sign/v1",
		"predicate":     map[string]any{"pad": strings.Repeat("p", n)},
	}
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Hole 2: 60 bundle referrers of about 2.9 MiB each (each within the limits)
// are fetched and checked one at a time within the byte budget.
func TestBundleReferrersStreamedWithinBudget(t *testing.T) {
	reg := newTestRegistry(t, true)
	d := reg.pushImage(t, "hostile/bundles")
	k, other := newTestKey(t, "ecdsa-p256"), newTestKey(t, "ecdsa-p256")
	b := keyBundle(t, other, paddedStatement(t, d, 2<<20+150<<10))
	if len(b) < 2800<<10 || len(b) > 3<<20 {
		t.Fatalf("bundle of %d bytes", len(b))
	}
	attachBundle(t, d, b)
	idx, err := remote.Referrers(d, remote.WithContext(t.Context()))
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("referrers: %v %v", im, err)
	}
	desc := im.Manifests[0]
	desc.ArtifactType = BundleMediaType
	hostile := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex}
	for range 60 {
		hostile.Manifests = append(hostile.Manifests, desc)
	}
	body, err := json.Marshal(hostile)
	if err != nil {
		t.Fatal(err)
	}
	reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/referrers/") {
			w.Header().Set("Content-Type", string(types.OCIImageIndex))
			_, _ = w.Write(body)
			return true
		}
		return false
	})
	v := newTestVerifier(t, reg, nil)
	p := policyFor(t, keysYAML("", 0, false, k))
	var res verdict.Result
	peak := peakHeap(t, func() { res = v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr()) })
	t.Logf("peak heap of one verification of 60 x %.1f MiB bundles: %.1f MiB (%s/%s)", float64(len(b))/(1<<20), float64(peak)/(1<<20), res.Verdict, res.Reason)
	if res.Verdict != verdict.Unverified || res.Reason != verdict.ReasonTooLarge || !res.Definitive() {
		t.Fatalf("got %s/%s (%s), want a definitive unverified/too-large", res.Verdict, res.Reason, res.Detail)
	}
	if peak > 48<<20 {
		t.Fatalf("peak heap %d MiB: bundles are held together", peak>>20)
	}
}

// Hole 3: a .sig manifest that redirects to itself is given up after 10
// redirects, not at the end of VerifyTimeout.
func TestRedirectLoopCapped(t *testing.T) {
	reg := newTestRegistry(t, true)
	d := reg.pushImage(t, "hostile/redirect")
	k := newTestKey(t, "ecdsa-p256")
	var hops atomic.Int64
	reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, ".sig") {
			return false
		}
		n := hops.Add(1)
		http.Redirect(w, r, fmt.Sprintf("%s?hop=%d", r.URL.Path, n), http.StatusTemporaryRedirect)
		return true
	})
	v := newTestVerifier(t, reg, func(o *Options) { o.VerifyTimeout = 5 * time.Second })
	p := policyFor(t, keysYAML("", 0, false, k))
	var res verdict.Result
	start := time.Now()
	peak := peakHeap(t, func() { res = v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr()) })
	took := time.Since(start)
	t.Logf("self-redirecting .sig: %d requests in %v, peak heap %.1f MiB (%s/%s)", hops.Load(), took, float64(peak)/(1<<20), res.Verdict, res.Reason)
	if res.Verdict != verdict.Pending || res.Reason != verdict.ReasonRegistryError {
		t.Fatalf("got %s/%s (%s), want pending/registry-error", res.Verdict, res.Reason, res.Detail)
	}
	if n := hops.Load(); n > maxRedirects+1 {
		t.Fatalf("%d requests to a self-redirecting .sig, want at most %d", n, maxRedirects+1)
	}
}

// Hole 3: RequestTimeout bounds a request with all its redirect hops, not
// each hop: a chain of slow hops, each well within the timeout, stops at it.
func TestRedirectChainSharesOneDeadline(t *testing.T) {
	t.Parallel()
	reg := newTestRegistry(t, true)
	d := reg.pushImage(t, "hostile/slowchain")
	k := newTestKey(t, "ecdsa-p256")
	var hops atomic.Int64
	reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, ".sig") {
			return false
		}
		n := hops.Add(1)
		// A slow hop: answer after 200 ms unless the client gives up first.
		tm := time.NewTimer(200 * time.Millisecond)
		defer tm.Stop()
		select {
		case <-r.Context().Done():
			return true
		case <-tm.C:
		}
		http.Redirect(w, r, fmt.Sprintf("%s?hop=%d", r.URL.Path, n), http.StatusTemporaryRedirect)
		return true
	})
	v := newTestVerifier(t, reg, func(o *Options) {
		o.RequestTimeout = 500 * time.Millisecond
		o.VerifyTimeout = 6 * time.Second
		o.Retries = -1
	})
	res := v.Verify(t.Context(), policyFor(t, keysYAML("", 0, false, k)), d.Context().Name(), d.DigestStr())
	t.Logf("slow redirect chain: %d hops (%s/%s)", hops.Load(), res.Verdict, res.Reason)
	if res.Verdict != verdict.Pending {
		t.Fatalf("got %s/%s (%s), want pending", res.Verdict, res.Reason, res.Detail)
	}
	// 500 ms at 200 ms per hop: at most 3 hops start.
	if n := hops.Load(); n > 4 {
		t.Fatalf("%d hops of 200 ms within a 500 ms request timeout: the timeout applies per hop", n)
	}
}

// Hole 4: the per-host rate limiters stay bounded however many hosts are
// seen (a redirect storm makes one per target host).
func TestHostLimitersBounded(t *testing.T) {
	h := &hostLimits{qps: 50, burst: 100}
	const hosts = 180_000
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	ctx := context.Background()
	for i := range hosts {
		if err := h.wait(ctx, fmt.Sprintf("storage-%d.example:443", i)); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	var retained uint64
	if after.HeapAlloc > before.HeapAlloc {
		retained = after.HeapAlloc - before.HeapAlloc
	}
	runtime.KeepAlive(h)
	t.Logf("heap retained by the limiters of %d hosts: %.2f MiB", hosts, float64(retained)/(1<<20))
	if retained > 4<<20 {
		t.Fatalf("%d MiB retained for %d hosts: the limiter map is not bounded", retained>>20, hosts)
	}
}

// Hole 8: threshold 2 of {".*@example\.com", "bob@example.com"} holds
// whatever the order of the signatures, in both paths.
func TestThresholdMatchingIsOrderIndependent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const alice, bob = "alice@example.com", "bob@example.com"
	yaml := fmt.Sprintf("trustedRoot: %s\npolicies:\n- name: test\n  images: [\"**\"]\n  threshold: 2\n  keyless:\n  - issuer: %s\n    subjectRegExp: '.*@example\\.com'\n  - issuer: %s\n    subject: %s\n", e.vs.rootPath, issuer, issuer, bob)
	p := policyFor(t, yaml)
	v := newTestVerifier(t, e.reg, nil)
	for _, order := range [][]string{{alice, bob}, {bob, alice}} {
		t.Run("legacy "+strings.Join(order, ","), func(t *testing.T) {
			d := e.reg.pushImage(t, "match/legacy")
			var ls []sigLayer
			for _, who := range order {
				ls = append(ls, e.vs.keylessSig(t, who, issuer, simplePayload(t, d), true))
			}
			putSigManifest(t, d.Context(), sigTag(d), ls)
			res := v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr())
			if res.Verdict != verdict.Verified {
				t.Fatalf("got %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
			}
		})
		t.Run("bundle "+strings.Join(order, ","), func(t *testing.T) {
			d := e.reg.pushImage(t, "match/bundle")
			tl := newTally(p)
			for _, who := range order {
				raw := e.vs.keylessBundle(t, who, issuer, cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1"))
				var b sgbundle.Bundle
				if err := b.UnmarshalJSON(raw); err != nil {
					t.Fatal(err)
				}
				v.checkBundle(t.Context(), p, sigBundle{b: &b}, d, tl)
			}
			if !tl.met() {
				t.Fatalf("threshold not met: %v", tl.failure())
			}
		})
	}
	t.Run("one signer cannot fill both", func(t *testing.T) {
		d := e.reg.pushImage(t, "match/one")
		putSigManifest(t, d.Context(), sigTag(d), []sigLayer{
			e.vs.keylessSig(t, bob, issuer, simplePayload(t, d), true), e.vs.keylessSig(t, bob, issuer, simplePayload(t, d), true)})
		res := v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr())
		if res.Verdict != verdict.Unverified || res.Reason != verdict.ReasonThresholdNotMet {
			t.Fatalf("got %s/%s (%s), want unverified/threshold-not-met", res.Verdict, res.Reason, res.Detail)
		}
	})
}

// Hole 9: a .sig manifest redirected to a pre-signed URL that then fails
// (here: nothing listens there) leaves no query string nor user info in
// Result.Detail or the log.
func TestPresignedURLRedacted(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()
	tests := []struct{ name, location string }{
		{"query", "http://" + closed + "/presigned/object?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefsecret"},
		{"user info", "http://presigneduser:deadbeefsecret@" + closed + "/presigned/object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			reg := newTestRegistry(t, true)
			d := reg.pushImage(t, "hostile/presigned")
			k := newTestKey(t, "ecdsa-p256")
			reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
				if strings.HasSuffix(r.URL.Path, ".sig") {
					http.Redirect(w, r, tt.location, http.StatusTemporaryRedirect)
					return true
				}
				return false
			})
			var logs bytes.Buffer
			v := newTestVerifier(t, reg, func(o *Options) {
				o.Registries.Insecure = append(o.Registries.Insecure, closed)
				o.Retries = -1
				o.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			})
			res := v.Verify(t.Context(), policyFor(t, keysYAML("", 0, false, k)), d.Context().Name(), d.DigestStr())
			if res.Verdict != verdict.Pending || res.Detail == "" {
				t.Fatalf("got %s/%s (%s), want pending with a detail", res.Verdict, res.Reason, res.Detail)
			}
			for what, s := range map[string]string{"detail": res.Detail, "log": logs.String()} {
				for _, secret := range []string{"deadbeefsecret", "AKIAEXAMPLE", "presigneduser"} {
					if strings.Contains(s, secret) {
						t.Errorf("%s leaks %q: %s", what, secret, s)
					}
				}
			}
			t.Logf("detail: %s", res.Detail)
		})
	}
}
