package verify

import (
	"container/list"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"golang.org/x/time/rate"
	"k8s.io/apimachinery/pkg/util/wait"
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
// not belong to (e.g. a token realm on another host), refuses a request past
// maxRedirects redirects, applies a request timeout that covers a request
// with all its redirect hops and the reading of the body, caps every response
// body and charges it to the verification's byte budget, and retries 429/5xx
// and network errors with capped exponential backoff and jitter. Every
// attempt first waits for the rate limiter of the registry it is made for,
// so a relist of thousands of new digests cannot hammer one registry.
type guardTransport struct {
	// transportFor returns the RoundTripper for a host (host or host:port,
	// lower case). One for all hosts today; per-host TLS settings or mirrors
	// plug in here.
	transportFor func(host string) http.RoundTripper
	creds        basicGuard
	insecure     map[string]bool
	timeout      time.Duration
	maxBody      int64
	retries      int
	backoff      time.Duration
	limits       *hostLimits
	log          *slog.Logger
}

// basicGuard says whether a Basic Authorization header may go to a host;
// the credential source (today one docker config.json) implements it.
type basicGuard interface {
	allowsBasic(host, header string) bool
}

var _ basicGuard = (*dockerKeychain)(nil)

// maxHostLimiters bounds the rate limiters kept (least recently used first
// out): one per registry a verification is for, so the count follows the
// registries of the node's images, not the hosts a registry redirects to.
const maxHostLimiters = 256

// hostLimits holds one token bucket per registry host, at most
// maxHostLimiters of them. The zero value with qps and burst set is ready.
type hostLimits struct {
	qps   rate.Limit
	burst int

	mu    sync.Mutex               // guards order and byKey
	order list.List                // of *hostLimiter, most recently used first
	byKey map[string]*list.Element // host -> element of order
}

type hostLimiter struct {
	host string
	l    *rate.Limiter
}

// limiter returns the bucket of host, creating it (and evicting the least
// recently used one past the bound) when needed.
func (h *hostLimits) limiter(host string) *rate.Limiter {
	h.mu.Lock()
	defer h.mu.Unlock()
	if e, ok := h.byKey[host]; ok {
		h.order.MoveToFront(e)
		return e.Value.(*hostLimiter).l
	}
	if h.byKey == nil {
		h.byKey = map[string]*list.Element{}
	}
	l := rate.NewLimiter(h.qps, h.burst)
	h.byKey[host] = h.order.PushFront(&hostLimiter{host: host, l: l})
	for len(h.byKey) > maxHostLimiters {
		old := h.order.Back()
		h.order.Remove(old)
		delete(h.byKey, old.Value.(*hostLimiter).host)
	}
	return l
}

// len is the number of limiters kept.
func (h *hostLimits) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.byKey)
}

// wait blocks until host may get another request, or ctx is done.
func (h *hostLimits) wait(ctx context.Context, host string) error {
	if h == nil || h.qps <= 0 {
		return nil
	}
	if err := h.limiter(host).Wait(ctx); err != nil {
		return fmt.Errorf("waiting for the request budget of %s: %w", host, err)
	}
	return nil
}

// registryKey carries, in a request's context, the registry host that a
// verification is for: its requests, and those to the hosts it redirects to
// (blob storage, CDNs), share that registry's rate limiter.
type registryKey struct{}

func withRegistry(ctx context.Context, host string) context.Context {
	return context.WithValue(ctx, registryKey{}, strings.ToLower(host))
}

// limiterHost is the host whose rate limiter a request waits for.
func limiterHost(req *http.Request) string {
	if h, ok := req.Context().Value(registryKey{}).(string); ok && h != "" {
		return h
	}
	return strings.ToLower(req.URL.Host)
}

// byteBudget is what one verification may still read from registries, all
// responses together (manifests, signature layers, bundles, tokens).
type byteBudget struct {
	limit int64
	left  atomic.Int64
}

type budgetKey struct{}

func withBudget(ctx context.Context, n int64) context.Context {
	b := &byteBudget{limit: n}
	b.left.Store(n)
	return context.WithValue(ctx, budgetKey{}, b)
}

func budgetOf(ctx context.Context) *byteBudget {
	b, _ := ctx.Value(budgetKey{}).(*byteBudget)
	return b
}

// take charges n bytes; past the budget it fails with ErrTooLarge.
func (b *byteBudget) take(n int64) error {
	if b == nil {
		return nil
	}
	if b.left.Add(-n) < 0 {
		return fmt.Errorf("%w: one verification read more than %d bytes from registries", ErrTooLarge, b.limit)
	}
	return nil
}

// fits reports whether n more bytes fit in the budget.
func (b *byteBudget) fits(n int64) bool { return b == nil || b.left.Load() >= n }

// maxRedirects is how many redirects one request may follow (Go's own cap,
// which go-containerregistry's redirect check replaces with none).
const maxRedirects = 10

// maxBackoff caps the exponential backoff step before jitter.
const maxBackoff = 5 * time.Second

// errRefused marks requests pinwarden refuses to send; they are never retried.
var errRefused = errors.New("request refused by pinwarden")

// redirectChain returns how many redirects led to req and the deadline of
// the request that started the chain (zero when req is not a redirect).
// net/http's client links each redirect to the response that caused it,
// and each response to the request that got it.
func redirectChain(req *http.Request) (int, time.Time) {
	hops := 0
	var deadline time.Time
	for r := req; r.Response != nil && r.Response.Request != nil; r = r.Response.Request {
		hops++
		if d, ok := r.Response.Request.Context().Deadline(); ok {
			deadline = d
		}
		if hops > maxRedirects {
			break
		}
	}
	return hops, deadline
}

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
	if h := req.Header.Get("Authorization"); strings.HasPrefix(h, "Basic ") && !g.creds.allowsBasic(host, h) {
		req = req.Clone(req.Context())
		req.Header.Del("Authorization")
		g.log.Debug("stripped credentials from request to a host they do not belong to", "host", host)
	}
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		return nil, fmt.Errorf("%w: method %s: pinwarden only reads from registries", errRefused, req.Method)
	}
	hops, deadline := redirectChain(req)
	if hops > maxRedirects {
		return nil, fmt.Errorf("%w: more than %d redirects", errRefused, maxRedirects)
	}
	// Step i waits about RetryBackoff*2^i, the step capped at maxBackoff,
	// plus a random 0-50% of it (wait.Backoff's jitter only adds).
	bo := wait.Backoff{Duration: g.backoff, Factor: 2, Jitter: 0.5, Steps: g.retries, Cap: maxBackoff}
	var lastErr error
	for attempt := 0; ; attempt++ {
		resp, err := g.once(req, deadline)
		retry := false
		var after time.Duration
		switch {
		case err != nil:
			lastErr = err
			retry = req.Context().Err() == nil && !errors.Is(err, ErrTooLarge) && !errors.Is(err, errRefused)
		case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
			retry = true
			after = retryAfter(resp.Header.Get("Retry-After"))
		}
		// A redirect hop past its chain's deadline is not worth another try.
		if !deadline.IsZero() && !time.Now().Before(deadline) {
			retry = false
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
		d := bo.Step()
		if after > d {
			// Honour Retry-After, up to the cap.
			d = min(after, maxBackoff)
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

// once performs one attempt: under the request timeout, or for a redirect
// hop, under the deadline of the request that started the chain.
func (g *guardTransport) once(req *http.Request, chainDeadline time.Time) (*http.Response, error) {
	host := strings.ToLower(req.URL.Host)
	if err := g.limits.wait(req.Context(), limiterHost(req)); err != nil {
		return nil, err
	}
	var ctx context.Context
	var cancel context.CancelFunc
	if chainDeadline.IsZero() {
		ctx, cancel = context.WithTimeout(req.Context(), g.timeout)
	} else {
		ctx, cancel = context.WithDeadline(req.Context(), chainDeadline)
	}
	resp, err := g.transportFor(host).RoundTrip(req.WithContext(ctx))
	if err != nil {
		cancel()
		return nil, err
	}
	budget := budgetOf(req.Context())
	if resp.ContentLength > g.maxBody || !budget.fits(resp.ContentLength) {
		resp.Body.Close()
		cancel()
		if resp.ContentLength > g.maxBody {
			return nil, fmt.Errorf("%w: response of %d bytes from %s (limit %d)", ErrTooLarge, resp.ContentLength, redactURL(req.URL), g.maxBody)
		}
		return nil, fmt.Errorf("%w: response of %d bytes from %s: one verification read more than %d bytes from registries",
			ErrTooLarge, resp.ContentLength, redactURL(req.URL), budget.limit)
	}
	if resp.Request == nil {
		resp.Request = req.WithContext(ctx) // redirectChain follows it
	}
	resp.Body = &limitedBody{rc: resp.Body, left: g.maxBody, budget: budget, cancel: cancel}
	return resp, nil
}

// limitedBody fails reads past the limit and releases the request context on Close.
type limitedBody struct {
	rc     io.ReadCloser
	left   int64
	budget *byteBudget // nil: no budget
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
	if berr := b.budget.take(int64(n)); berr != nil {
		return 0, berr
	}
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
