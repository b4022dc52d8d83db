package verify

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// signedImage pushes an image signed by a fresh ECDSA key and returns it with its policy.
func signedImage(t *testing.T, reg *testRegistry, repo string) (name.Digest, *policy.Policy) {
	t.Helper()
	k := newTestKey(t, "ecdsa-p256")
	d := reg.pushImage(t, repo)
	putSigManifest(t, d.Context(), sigTag(d), []sigLayer{keySig(t, k, simplePayload(t, d))})
	return d, policyFor(t, keysYAML("", 0, false, k))
}

func TestRegistryFailures(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		fault   func(calls *atomic.Int64) func(w http.ResponseWriter, r *http.Request) bool
		closed  bool
		want    verdict.Verdict
		reason  string
		minHits int64 // at least this many faulted requests (retries)
	}{
		{name: "registry down (closed port)", closed: true, want: verdict.Pending, reason: verdict.ReasonRegistryUnreachable},
		{name: "registry answers 500", fault: func(c *atomic.Int64) func(http.ResponseWriter, *http.Request) bool {
			return func(w http.ResponseWriter, r *http.Request) bool {
				if r.URL.Path == "/v2/" {
					return false
				}
				c.Add(1)
				http.Error(w, "boom", http.StatusInternalServerError)
				return true
			}
		}, want: verdict.Pending, reason: verdict.ReasonRegistryError, minHits: 4},
		{name: "429 then success", fault: func(c *atomic.Int64) func(http.ResponseWriter, *http.Request) bool {
			return func(w http.ResponseWriter, r *http.Request) bool {
				if strings.HasSuffix(r.URL.Path, ".sig") && c.Add(1) <= 2 {
					w.Header().Set("Retry-After", "0")
					http.Error(w, "slow down", http.StatusTooManyRequests)
					return true
				}
				return false
			}
		}, want: verdict.Verified, minHits: 3},
		{name: "401 on the signature manifest", fault: func(c *atomic.Int64) func(http.ResponseWriter, *http.Request) bool {
			return func(w http.ResponseWriter, r *http.Request) bool {
				if strings.HasSuffix(r.URL.Path, ".sig") {
					c.Add(1)
					http.Error(w, "no", http.StatusForbidden)
					return true
				}
				return false
			}
		}, want: verdict.Pending, reason: verdict.ReasonRegistryError, minHits: 1},
		{name: "signature manifest that is also an index", fault: func(c *atomic.Int64) func(http.ResponseWriter, *http.Request) bool {
			return func(w http.ResponseWriter, r *http.Request) bool {
				if strings.HasSuffix(r.URL.Path, ".sig") {
					c.Add(1)
					w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
					fmt.Fprint(w, `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[],"manifests":[{"digest":"sha256:`+strings.Repeat("0", 64)+`"}]}`)
					return true
				}
				return false
			}
		}, want: verdict.Pending, reason: verdict.ReasonRegistryError, minHits: 1},
		{name: "media type disagreeing with body", fault: func(c *atomic.Int64) func(http.ResponseWriter, *http.Request) bool {
			return func(w http.ResponseWriter, r *http.Request) bool {
				if strings.HasSuffix(r.URL.Path, ".sig") {
					c.Add(1)
					w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
					fmt.Fprint(w, `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`)
					return true
				}
				return false
			}
		}, want: verdict.Pending, reason: verdict.ReasonRegistryError, minHits: 1},
		{name: "endless signature manifest", fault: func(c *atomic.Int64) func(http.ResponseWriter, *http.Request) bool {
			return func(w http.ResponseWriter, r *http.Request) bool {
				if strings.HasSuffix(r.URL.Path, ".sig") {
					c.Add(1)
					w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
					chunk := []byte(strings.Repeat(" ", 64<<10))
					for i := 0; i < 1<<12; i++ { // up to 256 MiB unless the client hangs up
						if _, err := w.Write(chunk); err != nil {
							return true
						}
					}
					return true
				}
				return false
			}
		}, want: verdict.Unverified, reason: verdict.ReasonTooLarge, minHits: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			reg := newTestRegistry(t, true)
			d, p := signedImage(t, reg, "fail")
			var hits atomic.Int64
			if tt.fault != nil {
				reg.setFault(tt.fault(&hits))
			}
			if tt.closed {
				reg.srv.Close()
			}
			v := newTestVerifier(t, reg, nil)
			start := time.Now()
			res := v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr())
			if el := time.Since(start); el > 10*time.Second {
				t.Errorf("took %v", el)
			}
			if res.Verdict != tt.want || res.Reason != tt.reason {
				t.Fatalf("got %s/%s (%s), want %s/%s", res.Verdict, res.Reason, res.Detail, tt.want, tt.reason)
			}
			if hits.Load() < tt.minHits {
				t.Errorf("%d faulted requests, want >= %d", hits.Load(), tt.minHits)
			}
		})
	}
}

// An unreachable registry that times out (accepts, never answers) is pending too.
func TestRegistryTimeout(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c) // hold it open, say nothing
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	host := ln.Addr().String()
	k := newTestKey(t, "ecdsa-p256")
	v, err := New(Options{Registries: config.Registries{Insecure: []string{host}}, RequestTimeout: 200 * time.Millisecond,
		RetryBackoff: time.Millisecond, Retries: 1})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	res := v.Verify(t.Context(), policyFor(t, keysYAML("", 0, false, k)), host+"/x", "sha256:"+strings.Repeat("a", 64))
	if res.Verdict != verdict.Pending || res.Reason != verdict.ReasonRegistryUnreachable {
		t.Fatalf("got %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("took %v", el)
	}
}

func TestReferrersLimits(t *testing.T) {
	t.Parallel()
	index := func(n int, artifactType string, ann map[string]string) []byte {
		im := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex}
		for i := range n {
			h := v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%064x", i)}
			im.Manifests = append(im.Manifests, v1.Descriptor{MediaType: types.OCIManifestSchema1, Size: 500, Digest: h,
				ArtifactType: artifactType, Annotations: ann})
		}
		b, _ := json.Marshal(im)
		return b
	}
	tests := []struct {
		name   string
		body   []byte
		want   verdict.Verdict
		reason string
	}{
		{"10,000 bundle referrers", index(10000, BundleMediaType, nil), verdict.Unverified, verdict.ReasonTooLarge},
		{"10,000 unrelated referrers", index(10000, "application/spdx+json", nil), verdict.Unverified, verdict.ReasonNoSignature},
		{"referrers index over the response limit", index(60000, "application/spdx+json", map[string]string{"pad": strings.Repeat("x", 100)}), verdict.Unverified, verdict.ReasonTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			reg := newTestRegistry(t, true)
			k := newTestKey(t, "ecdsa-p256")
			d := reg.pushImage(t, "refs")
			var manifestGets atomic.Int64
			reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
				if strings.Contains(r.URL.Path, "/referrers/") {
					w.Header().Set("Content-Type", string(types.OCIImageIndex))
					_, _ = w.Write(tt.body)
					return true
				}
				if strings.Contains(r.URL.Path, "/manifests/sha256:") {
					manifestGets.Add(1)
				}
				return false
			})
			start := time.Now()
			res := newTestVerifier(t, reg, nil).Verify(t.Context(), policyFor(t, keysYAML("", 0, false, k)), d.Context().Name(), d.DigestStr())
			if el := time.Since(start); el > 10*time.Second {
				t.Errorf("took %v", el)
			}
			if res.Verdict != tt.want || res.Reason != tt.reason {
				t.Fatalf("got %s/%s (%s), want %s/%s", res.Verdict, res.Reason, res.Detail, tt.want, tt.reason)
			}
			if n := manifestGets.Load(); n != 0 {
				t.Errorf("fetched %d referrer manifests", n)
			}
		})
	}
}

// Registries without the Referrers API: cosign writes the "sha256-<hex>"
// tag index instead, and pinwarden reads it.
func TestReferrersTagFallback(t *testing.T) {
	t.Parallel()
	reg := newTestRegistry(t, false)
	k := newTestKey(t, "ecdsa-p256")
	d := reg.pushImage(t, "fallback")
	attachBundle(t, d, keyBundle(t, k, cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1")))
	var fallbackHits atomic.Int64
	reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasSuffix(r.URL.Path, "/manifests/"+strings.Replace(d.DigestStr(), ":", "-", 1)) {
			fallbackHits.Add(1)
		}
		return false
	})
	res := newTestVerifier(t, reg, nil).Verify(t.Context(), policyFor(t, keysYAML("", 0, false, k)), d.Context().Name(), d.DigestStr())
	if res.Verdict != verdict.Verified {
		t.Fatalf("got %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
	}
	if fallbackHits.Load() == 0 {
		t.Error("the referrers tag fallback was not used")
	}
}

// authRegistry serves the test registry behind auth: Basic (creds checked) or
// a Bearer challenge whose realm is a token server on another host.
type authRecorder struct {
	mu   sync.Mutex
	seen []string // "host auth-header" of every request to the token server
}

func TestCredentialsStayWithTheirHost(t *testing.T) {
	t.Parallel()
	const user, pass = "pinwarden", "s3cret-only-for-the-registry"
	basic := "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))

	rec := &authRecorder{}
	tokenSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec.mu.Lock()
		rec.seen = append(rec.seen, r.Header.Get("Authorization"))
		rec.mu.Unlock()
		_ = json.NewEncoder(w).Encode(map[string]string{"token": "anon-token"})
	}))
	t.Cleanup(tokenSrv.Close)
	_, tokenPort, _ := net.SplitHostPort(strings.TrimPrefix(tokenSrv.URL, "http://"))
	tokenHost := "localhost:" + tokenPort // a hostname, so ggcr's own IP-literal guard does not intervene

	tests := []struct {
		name       string
		challenge  string // "basic" or "bearer"
		wantAuthOK bool
	}{
		{"basic auth: credentials reach their own registry", "basic", true},
		{"bearer realm on another host gets no credentials", "bearer", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			reg := newTestRegistry(t, true)
			d, p := signedImage(t, reg, "private")
			var gotBasic atomic.Int64
			reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
				h := r.Header.Get("Authorization")
				switch {
				case h == basic:
					gotBasic.Add(1)
					return false
				case h == "Bearer anon-token":
					return false
				case tt.challenge == "basic":
					w.Header().Set("WWW-Authenticate", `Basic realm="registry"`)
				default:
					w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://%s/token",service="registry"`, tokenHost))
				}
				http.Error(w, "auth", http.StatusUnauthorized)
				return true
			})
			cfgPath := filepath.Join(t.TempDir(), "config.json")
			cfg := fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, reg.host, base64.StdEncoding.EncodeToString([]byte(user+":"+pass)))
			if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
				t.Fatal(err)
			}
			v := newTestVerifier(t, reg, func(o *Options) {
				o.Registries.DockerConfig = cfgPath
				o.Registries.Insecure = append(o.Registries.Insecure, tokenHost)
			})
			res := v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr())
			if res.Verdict != verdict.Verified {
				t.Fatalf("got %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
			}
			if tt.wantAuthOK && gotBasic.Load() == 0 {
				t.Error("the registry never received its credentials")
			}
			rec.mu.Lock()
			defer rec.mu.Unlock()
			for _, h := range rec.seen {
				if strings.Contains(h, base64.StdEncoding.EncodeToString([]byte(user+":"+pass))) {
					t.Fatalf("token server on another host received the registry's credentials: %q", h)
				}
			}
			if !tt.wantAuthOK && len(rec.seen) == 0 {
				t.Error("the token server was never asked; the test did not exercise the realm path")
			}
		})
	}
}

func TestResolve(t *testing.T) {
	t.Parallel()
	reg := newTestRegistry(t, true)
	d := reg.pushImage(t, "resolve")
	v := newTestVerifier(t, reg, nil)
	got, err := v.Resolve(t.Context(), policy.Ref{Repo: d.Context().Name(), Tag: "v1"})
	if err != nil || got != d.DigestStr() {
		t.Fatalf("Resolve = %q, %v; want %s", got, err, d.DigestStr())
	}
	if _, err := v.Resolve(t.Context(), policy.Ref{Repo: d.Context().Name(), Tag: "missing"}); err == nil {
		t.Fatal("Resolve of a missing tag succeeded")
	}
	dig := "sha256:" + strings.Repeat("c", 64)
	if got, err := v.Resolve(t.Context(), policy.Ref{Repo: d.Context().Name(), Tag: "v1", Digest: dig}); err != nil || got != dig {
		t.Fatalf("Resolve with digest = %q, %v", got, err)
	}
}

// An endless signature blob and an endless manifest are cut at the response
// limit: the bytes allocated stay within a small multiple of it. (Not
// parallel: it reads process-wide allocation counters.)
func TestEndlessRegistryMemory(t *testing.T) {
	reg := newTestRegistry(t, true)
	d, p := signedImage(t, reg, "endless")
	reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/blobs/") && !strings.HasSuffix(r.URL.Path, ".sig") {
			return false
		}
		if strings.HasSuffix(r.URL.Path, ".sig") {
			w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
		}
		chunk := []byte(strings.Repeat("x", 64<<10))
		for range 1 << 14 { // up to 1 GiB
			if _, err := w.Write(chunk); err != nil {
				return true
			}
		}
		return true
	})
	v := newTestVerifier(t, reg, nil)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	res := v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr())
	runtime.ReadMemStats(&after)
	if res.Verdict != verdict.Unverified || res.Reason != verdict.ReasonTooLarge {
		t.Fatalf("got %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
	}
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("allocated %d MiB against an endless registry (response limit %d MiB)", alloc>>20, v.opts.MaxResponseSize>>20)
	if alloc > 8*uint64(v.opts.MaxResponseSize) {
		t.Fatalf("allocated %d bytes", alloc)
	}
}

// Requests to one registry host are rate-limited (token bucket per host);
// another host has its own budget.
func TestRegistryRateLimitPerHost(t *testing.T) {
	t.Parallel()
	regA, regB := newTestRegistry(t, true), newTestRegistry(t, true)
	dA, pA := signedImage(t, regA, "limited")
	dB, pB := signedImage(t, regB, "limited")
	ct := &countingTransport{next: http.DefaultTransport}
	v := newTestVerifier(t, regA, func(o *Options) {
		o.Registries.Insecure = append(o.Registries.Insecure, regB.host)
		o.Transport = ct
		o.RegistryQPS, o.RegistryBurst = 20, 1 // one request every 50 ms per host
	})
	// Warm-up: the first verification of each host spends its burst.
	for _, c := range []struct {
		d name.Digest
		p *policy.Policy
	}{{dA, pA}, {dB, pB}} {
		if res := v.Verify(t.Context(), c.p, c.d.Context().Name(), c.d.DigestStr()); res.Verdict != verdict.Verified {
			t.Fatalf("got %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
		}
	}
	const rounds = 5
	start := time.Now()
	ct.n.Store(0)
	var wg sync.WaitGroup
	for range rounds {
		for _, c := range []struct {
			d name.Digest
			p *policy.Policy
		}{{dA, pA}, {dB, pB}} {
			wg.Go(func() {
				if res := v.Verify(t.Context(), c.p, c.d.Context().Name(), c.d.DigestStr()); res.Verdict != verdict.Verified {
					t.Errorf("got %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
				}
			})
		}
	}
	wg.Wait()
	took := time.Since(start)
	perHost := ct.n.Load() / 2
	// perHost requests at 20/s on each host, in parallel: at least
	// (perHost-1)*50ms, and clearly under the 2*perHost-1 steps that one
	// shared budget would need.
	step := 50 * time.Millisecond
	floor := time.Duration(perHost-1) * step
	shared := time.Duration(2*perHost-1) * step
	if took < floor {
		t.Fatalf("%d requests per host in %v: faster than 20/s, the limit is not applied", perHost, took)
	}
	if took > shared*9/10 {
		t.Fatalf("%d requests per host took %v: hosts seem to share one budget (shared floor %v)", perHost, took, shared)
	}
	t.Logf("%d requests per host at 20/s in %v (floor %v, a shared budget would need %v)", perHost, took, floor, shared)
}
