// Package hosts reads containerd's registry hosts directory (certs.d,
// hosts.toml) with containerd's own parser and yields, for a registry host,
// the ordered endpoints a pull goes to: mirrors first, then the upstream
// (or the `server` that hosts.toml names), each with its TLS settings (CA,
// client certificate, skip_verify), extra headers and path. HTTPS_PROXY and
// NO_PROXY apply as they do for containerd.
//
// It also provides the http.RoundTripper that sends each request to an
// endpoint through that endpoint's TLS settings and path.
package hosts

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/errdefs"
)

// Endpoint is one place a registry's content can be fetched from.
type Endpoint struct {
	// Host is host[:port] that requests go to.
	Host string
	// Scheme is "https" or "http"; "" for an upstream that no hosts.toml
	// configures, whose scheme the caller decides (registries.insecure).
	Scheme string
	// Path is the API root, "/v2" unless hosts.toml says otherwise.
	Path string
	// Mirror is true for every endpoint but the registry itself.
	Mirror bool
	// Resolve is true when the endpoint may resolve tags (the signature
	// tags "sha256-<hex>.sig" are tags); Pull when it serves content by digest.
	Resolve, Pull bool
	// Header is sent with every request to the endpoint.
	Header http.Header
	// Transport carries the endpoint's TLS settings and proxy from the
	// environment; nil for an unconfigured upstream (the caller's default).
	Transport http.RoundTripper
}

// Resolver answers endpoints per registry host from one hosts directory.
// It re-reads a host's files when they change (a few stats per call). It
// is safe for concurrent use.
type Resolver struct {
	dir string
	ttl time.Duration
	now func() time.Time
	// idlePerHost is the idle connections kept per endpoint host.
	idlePerHost int

	mu    sync.Mutex // guards cache and byEndpoint
	cache map[string]cached
	// byEndpoint maps an endpoint host to its transport and path for
	// RoundTrip; filled as Endpoints are answered.
	byEndpoint map[string]Endpoint
}

type cached struct {
	eps   []Endpoint
	stamp string
	born  time.Time
}

// Option configures a Resolver.
type Option func(*Resolver)

// WithIdleConnsPerHost keeps up to n idle connections per endpoint host
// (default 2, net/http's). Set it to the requests in flight per host:
// with fewer, every response past the first n closes its connection and
// the next request dials (and on TLS, handshakes) again.
func WithIdleConnsPerHost(n int) Option { return func(r *Resolver) { r.idlePerHost = n } }

// New returns a Resolver for dir (containerd's config_path, e.g.
// /etc/containerd/certs.d). An empty or missing dir configures nothing:
// every host is its own single upstream.
func New(dir string, opts ...Option) *Resolver {
	r := &Resolver{dir: dir, ttl: time.Minute, now: time.Now, cache: map[string]cached{}, byEndpoint: map[string]Endpoint{}}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Endpoints returns the endpoints of registry host in pull order.
func (r *Resolver) Endpoints(ctx context.Context, host string) ([]Endpoint, error) {
	host = strings.ToLower(host)
	stamp := r.stamp(host)
	r.mu.Lock()
	c, ok := r.cache[host]
	r.mu.Unlock()
	if ok && c.stamp == stamp && r.now().Sub(c.born) < r.ttl {
		return c.eps, nil
	}
	eps, err := r.load(ctx, host)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.cache[host] = cached{eps: eps, stamp: stamp, born: r.now()}
	for _, e := range eps {
		if e.Transport != nil {
			r.byEndpoint[e.Host] = e
		}
	}
	r.mu.Unlock()
	return eps, nil
}

// stamp summarises the files that configure host, to notice changes.
func (r *Resolver) stamp(host string) string {
	if r.dir == "" {
		return ""
	}
	var b strings.Builder
	for _, d := range hostDirs(r.dir, host) {
		for _, p := range []string{d, filepath.Join(d, "hosts.toml")} {
			if st, err := os.Stat(p); err == nil {
				fmt.Fprintf(&b, "%s:%d:%d;", p, st.Size(), st.ModTime().UnixNano())
			}
		}
	}
	return b.String()
}

// hostDirs are the directories containerd looks at for host, in order.
func hostDirs(root, host string) []string {
	var out []string
	if i := strings.LastIndex(host, ":"); i > 0 {
		out = append(out, filepath.Join(root, host[:i]+"_"+host[i+1:]+"_"))
	}
	return append(out, filepath.Join(root, host), filepath.Join(root, "_default"))
}

func (r *Resolver) load(ctx context.Context, host string) ([]Endpoint, error) {
	upstream := []Endpoint{{Host: host, Path: "/v2", Resolve: true, Pull: true}}
	if r.dir == "" {
		return upstream, nil
	}
	if _, err := config.HostDirFromRoot(r.dir)(host); errdefs.IsNotFound(err) {
		return upstream, nil
	} else if err != nil {
		return nil, fmt.Errorf("containerd hosts dir %s: %w", r.dir, err)
	}
	rhosts, err := config.ConfigureHosts(ctx, config.HostOptions{
		HostDir: config.HostDirFromRoot(r.dir),
		UpdateClient: func(c *http.Client) error {
			if t, ok := c.Transport.(*http.Transport); ok && r.idlePerHost > 0 {
				t.MaxIdleConnsPerHost = r.idlePerHost
				t.MaxIdleConns = max(t.MaxIdleConns, r.idlePerHost)
			}
			return nil
		},
	})(host)
	if err != nil {
		return nil, fmt.Errorf("containerd hosts config for %s: %w", host, err)
	}
	if len(rhosts) == 0 {
		return nil, errors.New("containerd hosts config for " + host + ": no endpoints")
	}
	eps := make([]Endpoint, 0, len(rhosts))
	seen := map[string]bool{}
	for _, h := range rhosts {
		// A [host] entry for the server itself and the server line name
		// the same endpoint; the first (with its TLS settings) stands.
		if k := h.Scheme + "://" + strings.ToLower(h.Host) + h.Path; seen[k] {
			continue
		} else {
			seen[k] = true
		}
		e := Endpoint{
			Host:    strings.ToLower(h.Host),
			Scheme:  h.Scheme,
			Path:    h.Path,
			Mirror:  isMirror(host, h.Host),
			Resolve: h.Capabilities.Has(docker.HostCapabilityResolve),
			Pull:    h.Capabilities.Has(docker.HostCapabilityPull),
			Header:  h.Header.Clone(),
		}
		if h.Client != nil {
			e.Transport = h.Client.Transport
		}
		eps = append(eps, e)
	}
	return eps, nil
}

// isMirror is containerd's test for a host that is not the registry itself.
func isMirror(refHost, host string) bool {
	host = strings.ToLower(host)
	if host == refHost {
		return false
	}
	return refHost != "docker.io" || host != "registry-1.docker.io"
}

// Transport returns an http.RoundTripper that sends a request for an
// endpoint host (one Endpoints returned) through that endpoint's transport,
// with its path and headers, and every other request through def.
func (r *Resolver) Transport(def http.RoundTripper) http.RoundTripper {
	return &transport{r: r, def: def}
}

type transport struct {
	r   *Resolver
	def http.RoundTripper
}

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	t.r.mu.Lock()
	e, ok := t.r.byEndpoint[strings.ToLower(req.URL.Host)]
	t.r.mu.Unlock()
	if !ok {
		return t.def.RoundTrip(req)
	}
	if e.Path != "/v2" || len(e.Header) > 0 {
		req = req.Clone(req.Context())
		if rest, ok := strings.CutPrefix(req.URL.Path, "/v2"); ok && e.Path != "/v2" {
			req.URL.Path = e.Path + rest
			req.URL.RawPath = ""
		}
		for k, vs := range e.Header {
			if req.Header.Get(k) == "" {
				req.Header[k] = slices.Clone(vs)
			}
		}
	}
	return e.Transport.RoundTrip(req)
}

// PlainHTTPHosts lists the endpoint hosts seen so far that use plain HTTP.
func (r *Resolver) PlainHTTPHosts() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, e := range slices.Sorted(maps.Keys(r.byEndpoint)) {
		if r.byEndpoint[e].Scheme == "http" {
			out = append(out, e)
		}
	}
	return out
}
