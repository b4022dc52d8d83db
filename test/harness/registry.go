package harness

import (
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
)

// DistributionBin is the Debian docker-registry (distribution 2.8) binary;
// PINWARDEN_DISTRIBUTION_BIN overrides it.
const DistributionBin = "/usr/bin/docker-registry"

// StartRegistry starts an in-process OCI registry (go-containerregistry, with
// OCI referrers support) on a loopback port and returns its host:port. It
// stops when the test ends.
func StartRegistry(t testing.TB) string {
	t.Helper()
	srv := httptest.NewServer(RegistryHandler())
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// RegistryHandler is the in-process OCI registry (go-containerregistry,
// with OCI referrers support, quiet) for tests that put their own
// middleware in front of it: counting requests, taking it down.
func RegistryHandler() http.Handler {
	return registry.New(registry.WithReferrersSupport(true), registry.Logger(log.New(io.Discard, "", 0)))
}

// CountingRegistry is the in-process registry (RegistryHandler) behind a
// middleware that counts what tests and benchmarks measure: every request,
// pinwarden's own (User-Agent "pinwarden...") with their paths, and the
// repositories with requests in flight at once (one repository per test
// image: the number of images being verified or pulled concurrently). It
// can slow blob downloads (WithBlobDelay) and be taken down and up again
// (SetDown) or for good (Close).
type CountingRegistry struct {
	// Host is the registry's host:port.
	Host      string
	srv       *httptest.Server
	blobDelay time.Duration
	all       atomic.Int64
	pinwarden atomic.Int64
	down      atomic.Bool

	mu       sync.Mutex     // guards the fields below
	inflight map[string]int // repository -> requests in flight
	maxRepos int
	paths    []string // URL paths of pinwarden's requests
}

// RegistryOption configures StartCountingRegistry.
type RegistryOption func(*CountingRegistry)

// WithBlobDelay delays every blob GET by d (a slow registry).
func WithBlobDelay(d time.Duration) RegistryOption {
	return func(r *CountingRegistry) { r.blobDelay = d }
}

// StartCountingRegistry starts a CountingRegistry on a loopback port; it
// stops when the test ends.
func StartCountingRegistry(t testing.TB, opts ...RegistryOption) *CountingRegistry {
	t.Helper()
	r := &CountingRegistry{inflight: map[string]int{}}
	for _, o := range opts {
		o(r)
	}
	h := RegistryHandler()
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if r.down.Load() {
			// A registry that went away: the connection closes unanswered.
			if hj, ok := w.(http.Hijacker); ok {
				if c, _, err := hj.Hijack(); err == nil {
					_ = c.Close()
					return
				}
			}
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		r.all.Add(1)
		if strings.HasPrefix(req.UserAgent(), "pinwarden") {
			r.pinwarden.Add(1)
			r.mu.Lock()
			r.paths = append(r.paths, req.URL.Path)
			r.mu.Unlock()
		}
		if repo := repoOf(req.URL.Path); repo != "" {
			r.mu.Lock()
			r.inflight[repo]++
			r.maxRepos = max(r.maxRepos, len(r.inflight))
			r.mu.Unlock()
			defer func() {
				r.mu.Lock()
				if r.inflight[repo]--; r.inflight[repo] == 0 {
					delete(r.inflight, repo)
				}
				r.mu.Unlock()
			}()
			if req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/") && r.blobDelay > 0 {
				time.Sleep(r.blobDelay) // the slow registry itself, not a wait
			}
		}
		h.ServeHTTP(w, req)
	}))
	t.Cleanup(r.srv.Close)
	r.Host = strings.TrimPrefix(r.srv.URL, "http://")
	return r
}

// Requests is the number of requests served so far.
func (r *CountingRegistry) Requests() int64 { return r.all.Load() }

// PinwardenRequests is the number of requests pinwarden made so far.
func (r *CountingRegistry) PinwardenRequests() int64 { return r.pinwarden.Load() }

// PinwardenPaths returns the URL paths of pinwarden's requests so far.
func (r *CountingRegistry) PinwardenPaths() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.paths)
}

// MaxInFlight is the most repositories that had requests in flight at once
// since the start or the last ResetMaxInFlight.
func (r *CountingRegistry) MaxInFlight() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.maxRepos
}

// ResetMaxInFlight starts a new MaxInFlight window.
func (r *CountingRegistry) ResetMaxInFlight() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.maxRepos = 0
}

// SetDown takes the registry down (every connection is closed without an
// answer) or brings it back.
func (r *CountingRegistry) SetDown(down bool) { r.down.Store(down) }

// Close stops the registry for good: its port refuses connections.
func (r *CountingRegistry) Close() { r.srv.Close() }

// repoOf returns the repository of a /v2/<repo>/(manifests|blobs|referrers)/... path.
func repoOf(path string) string {
	p, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return ""
	}
	for _, kind := range []string{"/manifests/", "/blobs/", "/referrers/"} {
		if i := strings.Index(p, kind); i > 0 {
			return p[:i]
		}
	}
	return ""
}
