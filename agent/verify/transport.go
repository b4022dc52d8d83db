package verify

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"golang.org/x/time/rate"
)

// dockerKeychain resolves credentials from ONE docker config.json file,
// never from $DOCKER_CONFIG, ~/.docker or credential helpers.
type dockerKeychain struct {
	// byHost maps a canonical host to its credentials; immutable after load.
	byHost map[string]authn.AuthConfig
}

var _ authn.Keychain = (*dockerKeychain)(nil)

// Docker Hub's config key and the hosts its credentials belong to (the
// registry and its token service).
var dockerHubHosts = []string{"index.docker.io", "registry-1.docker.io", "docker.io", "auth.docker.io"}

const maxDockerConfigSize = 1 << 20

func loadDockerConfig(path string) (*dockerKeychain, error) {
	kc := &dockerKeychain{byHost: map[string]authn.AuthConfig{}}
	if path == "" {
		return kc, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("docker config: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxDockerConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("docker config %s: %w", path, err)
	}
	if len(b) > maxDockerConfigSize {
		return nil, fmt.Errorf("docker config %s: larger than %d bytes", path, maxDockerConfigSize)
	}
	var cf struct {
		Auths map[string]struct {
			Auth          string `json:"auth"`
			Username      string `json:"username"`
			Password      string `json:"password"`
			IdentityToken string `json:"identitytoken"`
			RegistryToken string `json:"registrytoken"`
		} `json:"auths"`
	}
	if err := json.Unmarshal(b, &cf); err != nil {
		// The error text of encoding/json never quotes the input, so no secret leaks here.
		return nil, fmt.Errorf("docker config %s: %w", path, err)
	}
	for key, a := range cf.Auths {
		ac := authn.AuthConfig{Username: a.Username, Password: a.Password, IdentityToken: a.IdentityToken, RegistryToken: a.RegistryToken}
		if a.Auth != "" {
			dec, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return nil, fmt.Errorf("docker config %s: auths[%q].auth is not base64", path, key)
			}
			u, p, ok := strings.Cut(string(dec), ":")
			if !ok {
				return nil, fmt.Errorf("docker config %s: auths[%q].auth is not user:password", path, key)
			}
			ac.Username, ac.Password = u, p
		}
		host := configKeyHost(key)
		if host == "index.docker.io" {
			for _, h := range dockerHubHosts {
				kc.byHost[h] = ac
			}
			continue
		}
		kc.byHost[host] = ac
	}
	return kc, nil
}

// configKeyHost turns "https://host:port/v1/" or "host:port" into "host:port".
func configKeyHost(key string) string {
	k := key
	if i := strings.Index(k, "://"); i >= 0 {
		k = k[i+3:]
	}
	if i := strings.Index(k, "/"); i >= 0 {
		k = k[:i]
	}
	return strings.ToLower(k)
}

// Resolve implements authn.Keychain.
func (k *dockerKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if ac, ok := k.byHost[strings.ToLower(r.RegistryStr())]; ok {
		return authn.FromConfig(ac), nil
	}
	return authn.Anonymous, nil
}

// allowsBasic reports whether the Authorization header h may be sent to host:
// only when it carries exactly the credentials configured for that host.
func (k *dockerKeychain) allowsBasic(host, h string) bool {
	ac, ok := k.byHost[strings.ToLower(host)]
	if !ok || ac.Username == "" {
		return false
	}
	want := "Basic " + base64.StdEncoding.EncodeToString([]byte(ac.Username+":"+ac.Password))
	return h == want
}

// guardTransport is pinwarden's own layer under ggcr's auth transport. It
// enforces the scheme per host (plain HTTP only for insecure hosts, HTTPS
// never for them), strips Basic credentials from requests to a host they do
// not belong to (e.g. a token realm on another host), applies a per-request
// timeout that also covers reading the body, caps every response body, and
// retries 429/5xx and network errors with capped exponential backoff and
// full jitter. Every attempt first waits for the host's rate limiter, so a
// relist of thousands of new digests cannot hammer one registry.
type guardTransport struct {
	next     http.RoundTripper
	keychain *dockerKeychain
	insecure map[string]bool
	timeout  time.Duration
	maxBody  int64
	retries  int
	backoff  time.Duration
	limits   *hostLimits
	log      *slog.Logger
}

// hostLimits holds one token bucket per registry host.
type hostLimits struct {
	qps   rate.Limit
	burst int
	m     sync.Map // host -> *rate.Limiter
}

// wait blocks until host may get another request, or ctx is done.
func (h *hostLimits) wait(ctx context.Context, host string) error {
	if h == nil || h.qps <= 0 {
		return nil
	}
	l, ok := h.m.Load(host)
	if !ok {
		l, _ = h.m.LoadOrStore(host, rate.NewLimiter(h.qps, h.burst))
	}
	if err := l.(*rate.Limiter).Wait(ctx); err != nil {
		return fmt.Errorf("waiting for the request budget of %s: %w", host, err)
	}
	return nil
}

const maxBackoff = 5 * time.Second

// errRefused marks requests pinwarden refuses to send; they are never retried.
var errRefused = errors.New("request refused by pinwarden")

func (g *guardTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	host := strings.ToLower(req.URL.Host)
	switch {
	case req.URL.Scheme == "http" && !g.insecure[host]:
		return nil, fmt.Errorf("%w: plain HTTP to %s: not in registries.insecure", errRefused, host)
	case req.URL.Scheme == "https" && g.insecure[host]:
		return nil, fmt.Errorf("%w: HTTPS to %s: listed in registries.insecure", errRefused, host)
	case req.URL.Scheme != "http" && req.URL.Scheme != "https":
		return nil, fmt.Errorf("%w: scheme %q", errRefused, req.URL.Scheme)
	}
	if h := req.Header.Get("Authorization"); strings.HasPrefix(h, "Basic ") && !g.keychain.allowsBasic(host, h) {
		req = req.Clone(req.Context())
		req.Header.Del("Authorization")
		g.log.Debug("stripped credentials from request to a host they do not belong to", "host", host)
	}
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		return nil, fmt.Errorf("%w: method %s: pinwarden only reads from registries", errRefused, req.Method)
	}
	var lastErr error
	for attempt := 0; ; attempt++ {
		resp, err := g.once(req)
		retry := false
		var wait time.Duration
		switch {
		case err != nil:
			lastErr = err
			retry = req.Context().Err() == nil && !errors.Is(err, ErrTooLarge) && !errors.Is(err, errRefused)
		case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
			retry = true
			wait = retryAfter(resp.Header.Get("Retry-After"))
		}
		if !retry || attempt >= g.retries {
			if err != nil {
				return nil, lastErr
			}
			return resp, nil
		}
		if resp != nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
		}
		d := g.backoff << attempt
		if d > maxBackoff || d <= 0 {
			d = maxBackoff
		}
		d = rand.N(d) + d/2 // jitter in [d/2, 3d/2)
		if wait > d {
			d = min(wait, maxBackoff)
		}
		t := time.NewTimer(d)
		select {
		case <-req.Context().Done():
			t.Stop()
			return nil, req.Context().Err()
		case <-t.C:
		}
	}
}

func retryAfter(v string) time.Duration {
	if s, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && s > 0 {
		return time.Duration(s) * time.Second
	}
	return 0
}

// once performs one attempt under the per-request timeout.
func (g *guardTransport) once(req *http.Request) (*http.Response, error) {
	if err := g.limits.wait(req.Context(), strings.ToLower(req.URL.Host)); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(req.Context(), g.timeout)
	resp, err := g.next.RoundTrip(req.WithContext(ctx))
	if err != nil {
		cancel()
		return nil, err
	}
	if resp.ContentLength > g.maxBody {
		resp.Body.Close()
		cancel()
		return nil, fmt.Errorf("%w: response of %d bytes from %s (limit %d)", ErrTooLarge, resp.ContentLength, redactURL(req.URL), g.maxBody)
	}
	resp.Body = &limitedBody{rc: resp.Body, left: g.maxBody, cancel: cancel}
	return resp, nil
}

// limitedBody fails reads past the limit and releases the request context on Close.
type limitedBody struct {
	rc     io.ReadCloser
	left   int64
	cancel context.CancelFunc
	once   sync.Once
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		// Probe for one more byte: exactly at the limit is fine.
		var one [1]byte
		n, err := b.rc.Read(one[:])
		if n > 0 {
			return 0, fmt.Errorf("%w: response body larger than the limit", ErrTooLarge)
		}
		return 0, err
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.rc.Read(p)
	b.left -= int64(n)
	return n, err
}

func (b *limitedBody) Close() error {
	err := b.rc.Close()
	b.once.Do(b.cancel)
	return err
}

// redactURL drops the query (presigned URLs carry credentials there) and user info.
func redactURL(u *url.URL) string {
	c := *u
	c.RawQuery, c.User, c.Fragment = "", nil, ""
	return c.String()
}
