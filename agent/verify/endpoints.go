package verify

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/registry/hosts"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"golang.org/x/sync/singleflight"
)

// Registry sessions: the ping (auth challenge) is cached per registry host,
// not per repository, and bearer tokens per host, repository scope and
// credentials until shortly before they expire. A cold verification in a
// host already seen costs the signature requests only (2 for a legacy
// signature), plus 1 token request for a new repository scope.
const (
	challengeTTL    = 10 * time.Minute
	maxSessionItems = 4096
	tokenMargin     = 15 * time.Second
	defaultTokenTTL = time.Minute
)

type sessions struct {
	group      singleflight.Group // one ping / token exchange at a time per key
	mu         sync.Mutex         // guards challenges and tokens
	challenges map[string]challengeEntry
	tokens     map[string]tokenEntry
}

type challengeEntry struct {
	ch   *transport.Challenge
	born time.Time
}

type tokenEntry struct {
	tok     *transport.Token
	expires time.Time
}

func newSessions() *sessions {
	return &sessions{challenges: map[string]challengeEntry{}, tokens: map[string]tokenEntry{}}
}

// challenge pings reg once per challengeTTL; failures are not kept.
func (s *sessions) challenge(ctx context.Context, reg name.Registry, rt http.RoundTripper, plain bool) (*transport.Challenge, error) {
	key := "https://" + reg.RegistryStr()
	if plain {
		key = "http://" + reg.RegistryStr()
	}
	s.mu.Lock()
	e, ok := s.challenges[key]
	s.mu.Unlock()
	if ok && time.Since(e.born) < challengeTTL {
		return e.ch, nil
	}
	// Concurrent cold verifications of one host share a single ping.
	v, err, _ := s.group.Do("ping|"+key, func() (any, error) {
		// ggcr pings both schemes for insecure and loopback registries;
		// pinwarden knows which one the endpoint uses and skips the other.
		return transport.Ping(ctx, reg, schemeOnly{next: rt, plain: plain})
	})
	if err != nil {
		return nil, err
	}
	ch := v.(*transport.Challenge)
	s.mu.Lock()
	if len(s.challenges) >= maxSessionItems {
		clear(s.challenges)
	}
	s.challenges[key] = challengeEntry{ch: ch, born: time.Now()}
	s.mu.Unlock()
	return ch, nil
}

// schemeOnly fails requests of the other scheme at once (see challenge).
type schemeOnly struct {
	next  http.RoundTripper
	plain bool
}

var errSchemeSkipped = errors.New("not tried: the endpoint uses the other scheme")

func (s schemeOnly) RoundTrip(r *http.Request) (*http.Response, error) {
	if (r.URL.Scheme == "http") != s.plain {
		return nil, errSchemeSkipped
	}
	return s.next.RoundTrip(r)
}

// fixScheme sends requests for one registry host with the endpoint's
// scheme: ggcr builds http:// URLs for every loopback registry.
type fixScheme struct {
	next   http.RoundTripper
	host   string
	scheme string
}

func (f fixScheme) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Host == f.host && r.URL.Scheme != f.scheme {
		r = r.Clone(r.Context())
		r.URL.Scheme = f.scheme
	}
	return f.next.RoundTrip(r)
}

// token returns a bearer token for scope, from the cache or one exchange.
func (s *sessions) token(ctx context.Context, reg name.Registry, auth authn.Authenticator, rt http.RoundTripper, scope string, ch *transport.Challenge) (*transport.Token, error) {
	ac, err := authn.Authorization(ctx, auth)
	if err != nil {
		return nil, err
	}
	idb, err := json.Marshal(ac)
	if err != nil {
		return nil, err
	}
	id := sha256.Sum256(idb) // the key never holds the credentials themselves
	key := fmt.Sprintf("%s|%s|%x", reg.RegistryStr(), scope, id[:8])
	s.mu.Lock()
	e, ok := s.tokens[key]
	s.mu.Unlock()
	if ok && time.Now().Before(e.expires) {
		return e.tok, nil
	}
	v, err, _ := s.group.Do("token|"+key, func() (any, error) {
		return transport.Exchange(ctx, reg, auth, rt, []string{scope}, ch)
	})
	if err != nil {
		return nil, err
	}
	tok := v.(*transport.Token)
	ttl := defaultTokenTTL
	if tok.ExpiresIn > 0 {
		ttl = min(time.Duration(tok.ExpiresIn)*time.Second-tokenMargin, 5*time.Minute)
	}
	if ttl > 0 {
		s.mu.Lock()
		if len(s.tokens) >= maxSessionItems {
			clear(s.tokens)
		}
		s.tokens[key] = tokenEntry{tok: tok, expires: time.Now().Add(ttl)}
		s.mu.Unlock()
	}
	return tok, nil
}

// pullerFor returns a Puller for repository r that skips ggcr's per-repository
// handshake: the challenge and the token come from the sessions.
func (v *Verifier) pullerFor(ctx context.Context, r name.Repository, plain bool) (*remote.Puller, error) {
	auth, err := authn.Resolve(ctx, v.keychain, r)
	if err != nil {
		return nil, &RegistryError{Err: fmt.Errorf("credentials for %s: %w", r.RegistryStr(), err)}
	}
	scheme := "https"
	if plain {
		scheme = "http"
	}
	base := fixScheme{next: v.rt, host: r.RegistryStr(), scheme: scheme}
	ch, err := v.sessions.challenge(ctx, r.Registry, base, plain)
	if err != nil {
		return nil, classifyFetch("ping "+r.RegistryStr(), err)
	}
	tok := &transport.Token{}
	if strings.EqualFold(ch.Scheme, "bearer") {
		if tok, err = v.sessions.token(ctx, r.Registry, auth, base, r.Scope(transport.PullScope), ch); err != nil {
			return nil, classifyFetch("token for "+r.String(), err)
		}
	}
	rt, err := transport.FromToken(r.Registry, auth, base, ch, tok)
	if err != nil {
		return nil, &RegistryError{Err: fmt.Errorf("registry client for %s: %w", r.RegistryStr(), err)}
	}
	p, err := remote.NewPuller(remote.WithContext(ctx), remote.WithTransport(rt),
		remote.WithRetryStatusCodes(), remote.WithRetryPredicate(func(error) bool { return false }))
	if err != nil {
		return nil, fmt.Errorf("registry client: %w", err)
	}
	return p, nil
}

// endpointRepository is repository path at endpoint e of registry host,
// and whether the endpoint is plain HTTP.
func (v *Verifier) endpointRepository(e hosts.Endpoint, host, path string) (name.Repository, bool, error) {
	opts := []name.Option{name.StrictValidation}
	plain := e.Scheme == "http" || (e.Scheme == "" && v.insecure[host])
	if plain {
		opts = append(opts, name.Insecure)
	}
	r, err := name.NewRepository(e.Host+"/"+path, opts...)
	return r, plain, err
}

// verifyEndpoints tries the registry's endpoints in pull order (containerd's
// hosts.toml: mirrors first, then the upstream) until one verifies. A mirror
// that fails is noted and the next endpoint is tried; the note says when a
// mirror had the image but not its signature. Fetching from more places
// never weakens the check: every signature must still verify for digest.
// signedName is repo as go-containerregistry names it (Docker Hub as
// index.docker.io), the name `cosign sign` writes into its payload.
func (v *Verifier) verifyEndpoints(ctx context.Context, p *policy.Policy, repo, signedName, digest string) (signers []string, note string, err error) {
	host, path, _ := strings.Cut(repo, "/")
	host = strings.ToLower(host)
	eps, err := v.hosts.Endpoints(ctx, host)
	if err != nil {
		return nil, "", &RegistryError{Err: err}
	}
	var usable []hosts.Endpoint
	for _, e := range eps {
		if e.Resolve { // the signature tags "sha256-<hex>.sig" are tags
			usable = append(usable, e)
		}
	}
	if len(usable) == 0 {
		return nil, "", &RegistryError{Err: fmt.Errorf("containerd hosts config for %s: no endpoint may resolve tags", host)}
	}
	var notes []string
	for i, e := range usable {
		r, plain, err := v.endpointRepository(e, host, path)
		if err != nil {
			return nil, "", fmt.Errorf("repository %q at %s: %w", repo, e.Host, err)
		}
		// The names the image may have been signed under (cosign writes
		// the repository it signed as docker-reference): the registry's,
		// then the endpoint's.
		signedAs := []string{signedName}
		if r.Name() != signedName {
			signedAs = append(signedAs, r.Name())
		}
		signers, err := v.verifyAt(ctx, p, r, plain, digest, signedAs)
		if err == nil {
			return signers, strings.Join(notes, "; "), nil
		}
		if i == len(usable)-1 || ctx.Err() != nil {
			if len(notes) > 0 {
				err = withNote(err, strings.Join(notes, "; "))
			}
			return nil, "", err
		}
		next := usable[i+1].Host
		kind := "endpoint"
		if e.Mirror {
			kind = "mirror"
		}
		var fe *FailureError
		switch {
		case errors.As(err, &fe) && fe.Reason == verdict.ReasonNoSignature && v.hasImage(ctx, r, plain, digest):
			notes = append(notes, fmt.Sprintf("%s %s has the image but not its signature; fell back to %s", kind, e.Host, next))
		case errors.As(err, &fe):
			notes = append(notes, fmt.Sprintf("%s %s: %s; fell back to %s", kind, e.Host, fe.Reason, next))
		default:
			notes = append(notes, fmt.Sprintf("%s %s failed (%s); fell back to %s", kind, e.Host, redactURLs(truncate(err.Error(), 200)), next))
		}
	}
	return nil, "", errors.New("unreachable")
}

// hasImage reports whether the endpoint of r serves the manifest of digest.
func (v *Verifier) hasImage(ctx context.Context, r name.Repository, plain bool, digest string) bool {
	puller, err := v.pullerFor(ctx, r, plain)
	if err != nil {
		return false
	}
	_, err = puller.Head(ctx, r.Digest(digest))
	return err == nil
}

// noted keeps the type of an error and adds where the signatures came from.
type noted struct {
	err  error
	note string
}

func (n *noted) Error() string { return n.err.Error() + " (" + n.note + ")" }
func (n *noted) Unwrap() error { return n.err }

func withNote(err error, note string) error { return &noted{err: err, note: note} }

// inflight caps concurrent requests per host.
type inflight struct {
	max int
	mu  sync.Mutex // guards sems
	sem map[string]chan struct{}
}

func (f *inflight) acquire(ctx context.Context, host string) (func(), error) {
	if f == nil || f.max <= 0 {
		return func() {}, nil
	}
	f.mu.Lock()
	if f.sem == nil {
		f.sem = map[string]chan struct{}{}
	}
	s, ok := f.sem[host]
	if !ok {
		if len(f.sem) >= maxSessionItems {
			clear(f.sem) // held slots drain into the dropped channels
		}
		s = make(chan struct{}, f.max)
		f.sem[host] = s
	}
	f.mu.Unlock()
	select {
	case s <- struct{}{}:
		var once sync.Once
		return func() { once.Do(func() { <-s }) }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for a request slot of %s: %w", host, ctx.Err())
	}
}
