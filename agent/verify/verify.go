// Package verify decides whether the signers of a policy signed one image
// digest. It fetches cosign signatures (legacy "sha256-<hex>.sig" tags and
// sigstore bundles attached as OCI referrers) by digest, with its own caps on
// sizes and counts, and verifies them with the cosign and sigstore-go
// libraries using only the trust material of pinwarden's config.
package verify

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pinwarden/pinwarden/agent/anchor"
	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/registry"
	"github.com/pinwarden/pinwarden/agent/registry/hosts"
	"github.com/pinwarden/pinwarden/agent/registry/pullsecrets"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"golang.org/x/time/rate"
)

// Options configure a Verifier. Zero values take the defaults noted.
type Options struct {
	// Registries: insecure hosts, the node's credential sources (docker
	// config, kubelet credential provider plugins) and containerd's hosts dir.
	Registries config.Registries
	// PullSecrets resolves pod pull secrets; used with Registries.PodPullSecrets.
	PullSecrets *pullsecrets.Keychain
	// CredentialHelperDir holds docker-credential-* helpers ("": $PATH).
	CredentialHelperDir string
	// MaxInFlightPerHost caps concurrent requests to one host (default 16).
	MaxInFlightPerHost int
	// RequestTimeout bounds one HTTP request including its body and all its
	// redirect hops (at most 10) (default 15s).
	RequestTimeout time.Duration
	// VerifyTimeout bounds one Verify or Resolve call (default 2m).
	VerifyTimeout time.Duration
	// Retries on 429, 5xx and network errors (default 3; negative: none).
	Retries int
	// RetryBackoff is the first backoff step, doubled per attempt up to 5s,
	// each step plus a random 0-50% of it (default 500ms).
	RetryBackoff time.Duration
	// MaxSignatures caps the layers of a .sig manifest (default 100).
	MaxSignatures int
	// MaxReferrers caps the bundle referrers of one digest (default 100).
	MaxReferrers int
	// MaxBlobSize caps a signature layer or bundle, judged from its descriptor
	// before reading (default 4 MiB).
	MaxBlobSize int64
	// MaxResponseSize caps any registry response body, manifests and
	// referrer indexes included (default 8 MiB).
	MaxResponseSize int64
	// MaxVerifyBytes caps what one verification reads from registries, all
	// responses together; past it the verdict is unverified/too-large
	// (default 4 x MaxResponseSize, 32 MiB). Signatures are read and checked
	// one at a time, so memory stays near one response whatever this is.
	MaxVerifyBytes int64
	// RegistryQPS and RegistryBurst rate-limit requests per registry host
	// (defaults: Registries.RequestsPerSecond and Registries.Burst, else 50/s
	// and 100; a negative RegistryQPS disables the limit).
	RegistryQPS   float64
	RegistryBurst int
	// Transport replaces http.DefaultTransport underneath pinwarden's own
	// limits and credential guard (tests, proxies).
	Transport http.RoundTripper
	// Logger; nil discards.
	Logger *slog.Logger
}

func (o *Options) defaults() {
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 15 * time.Second
	}
	if o.VerifyTimeout <= 0 {
		o.VerifyTimeout = 2 * time.Minute
	}
	switch {
	case o.Retries == 0:
		o.Retries = 3
	case o.Retries < 0:
		o.Retries = 0
	}
	if o.RetryBackoff <= 0 {
		o.RetryBackoff = 500 * time.Millisecond
	}
	if o.MaxSignatures <= 0 {
		o.MaxSignatures = 100
	}
	if o.MaxReferrers <= 0 {
		o.MaxReferrers = 100
	}
	if o.MaxBlobSize <= 0 {
		o.MaxBlobSize = 4 << 20
	}
	if o.MaxResponseSize <= 0 {
		o.MaxResponseSize = 8 << 20
	}
	if o.MaxResponseSize < o.MaxBlobSize {
		o.MaxResponseSize = o.MaxBlobSize
	}
	if o.MaxVerifyBytes <= 0 {
		o.MaxVerifyBytes = 4 * o.MaxResponseSize
	}
	if o.RegistryQPS == 0 {
		o.RegistryQPS = o.Registries.RequestsPerSecond
	}
	if o.RegistryQPS == 0 {
		o.RegistryQPS = 50
	}
	if o.RegistryBurst <= 0 {
		o.RegistryBurst = o.Registries.Burst
	}
	if o.RegistryBurst <= 0 {
		o.RegistryBurst = 100
	}
	if o.MaxInFlightPerHost <= 0 {
		o.MaxInFlightPerHost = 16
	}
	if o.Transport == nil {
		// http.DefaultTransport keeps 2 idle connections per host: at 16
		// requests in flight, 14 of every 16 responses would close their
		// connection and the next request dial again.
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = o.MaxInFlightPerHost
		o.Transport = t
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Verifier verifies image digests against compiled policies. It is safe for
// concurrent use; it holds no per-image state.
type Verifier struct {
	opts     Options
	keychain *registry.Keychain
	hosts    *hosts.Resolver
	sessions *sessions
	insecure map[string]bool
	rt       http.RoundTripper
	log      *slog.Logger
}

// New builds a Verifier. Credentials come from the sources named in
// opts.Registries (and nothing else: never $DOCKER_CONFIG or ~/.docker);
// endpoints, mirrors and TLS from containerd's hosts dir there.
func New(opts Options) (*Verifier, error) {
	opts.defaults()
	kc, err := registry.NewKeychain(registry.Options{Registries: opts.Registries, PullSecrets: opts.PullSecrets,
		CredentialHelperDir: opts.CredentialHelperDir, Logger: opts.Logger})
	if err != nil {
		return nil, err
	}
	insecure := map[string]bool{}
	for _, h := range opts.Registries.Insecure {
		insecure[strings.ToLower(h)] = true
	}
	hr := hosts.New(opts.Registries.ContainerdHostsDir, hosts.WithIdleConnsPerHost(opts.MaxInFlightPerHost))
	v := &Verifier{opts: opts, keychain: kc, hosts: hr, sessions: newSessions(), insecure: insecure, log: opts.Logger}
	next := hr.Transport(opts.Transport)
	v.rt = &guardTransport{
		transportFor: func(string) http.RoundTripper { return next },
		plainHTTP:    func(h string) bool { return slices.Contains(hr.PlainHTTPHosts(), h) },
		inflight:     &inflight{max: opts.MaxInFlightPerHost},
		creds:        keychainGuard{kc}, insecure: insecure, timeout: opts.RequestTimeout,
		maxBody: opts.MaxResponseSize, retries: opts.Retries, backoff: opts.RetryBackoff, log: opts.Logger,
		limits: &hostLimits{qps: rate.Limit(opts.RegistryQPS), burst: opts.RegistryBurst},
	}
	return v, nil
}

func (v *Verifier) remoteOptions(ctx context.Context) []remote.Option {
	return []remote.Option{
		remote.WithContext(ctx),
		remote.WithTransport(v.rt),
		remote.WithAuthFromKeychain(v.keychain),
		// Retries happen in guardTransport, with jitter and caps; none in ggcr.
		remote.WithRetryStatusCodes(),
		remote.WithRetryPredicate(func(error) bool { return false }),
		remote.WithUserAgent("pinwarden"),
	}
}

func (v *Verifier) repository(repo string) (name.Repository, error) {
	opts := []name.Option{name.StrictValidation}
	host, _, _ := strings.Cut(repo, "/")
	if v.insecure[strings.ToLower(host)] {
		opts = append(opts, name.Insecure)
	}
	return name.NewRepository(repo, opts...)
}

// Verify judges digest (in repository repo) under policy p. The result is
// verified only when at least p.Threshold distinct keys/identities verified a
// signature whose signed digest is exactly digest. Errors never yield verified:
// registry trouble gives pending, failed checks give unverified.
func (v *Verifier) Verify(ctx context.Context, p *policy.Policy, repo, digest string) verdict.Result {
	res := verdict.Result{Digest: digest, Source: verdict.SourceRegistry, VerifiedAt: time.Now()}
	switch {
	case p == nil:
		res.Verdict, res.Reason = verdict.Untrusted, verdict.ReasonNoPolicy
		return res
	case p.Deny:
		res.Verdict, res.Reason, res.Policy, res.Fingerprint = verdict.Untrusted, verdict.ReasonDenied, p.Name, p.Fingerprint
		return res
	case p.Ignore:
		res.Verdict, res.Policy, res.Fingerprint = verdict.Ignored, p.Name, p.Fingerprint
		return res
	}
	res.Policy, res.Fingerprint = p.Name, p.Fingerprint
	signers, note, err := v.verify(ctx, p, repo, digest)
	res.VerifiedAt = time.Now()
	if err == nil {
		res.Verdict, res.Signers, res.Detail = verdict.Verified, signers, note
		return res
	}
	// Error text can quote URLs (a redirect to a pre-signed URL): never
	// their query or user info, in the result or the log.
	msg := redactURLs(err.Error())
	res.Detail = truncate(msg, 1024)
	var fe *FailureError
	var re *RegistryError
	switch {
	case errors.As(err, &fe):
		res.Verdict, res.Reason = verdict.Unverified, fe.Reason
	case errors.As(err, &re) && re.Unreachable:
		res.Verdict, res.Reason = verdict.Pending, verdict.ReasonRegistryUnreachable
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled):
		res.Verdict, res.Reason = verdict.Pending, verdict.ReasonRegistryUnreachable
	default:
		res.Verdict, res.Reason = verdict.Pending, verdict.ReasonRegistryError
	}
	v.log.Debug("image not verified", "repo", repo, "digest", digest, "policy", p.Name,
		"verdict", res.Verdict, "reason", res.Reason, "err", msg)
	return res
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// checkPolicy asserts what Compile guarantees, so that a hand-built Policy
// cannot turn into a cosign call without identities or trust.
func checkPolicy(p *policy.Policy) error {
	if p.Threshold < 1 {
		return fmt.Errorf("policy %q: threshold %d < 1", p.Name, p.Threshold)
	}
	if len(p.Keys)+len(p.Identities) < p.Threshold {
		return fmt.Errorf("policy %q: threshold %d exceeds its %d signers", p.Name, p.Threshold, len(p.Keys)+len(p.Identities))
	}
	for _, k := range p.Keys {
		if k.Verifier == nil || k.ID == "" {
			return fmt.Errorf("policy %q: key %s not loaded", p.Name, k.Path)
		}
	}
	for _, id := range p.Identities {
		if id.Issuer == "" || (id.Subject == "" && id.SubjectRegExp == "") {
			return fmt.Errorf("policy %q: keyless identity without issuer or subject", p.Name)
		}
		if id.SubjectRegExp != "" {
			if err := anchor.Check(id.SubjectRegExp); err != nil {
				return fmt.Errorf("policy %q: identity regexp: %w", p.Name, err)
			}
		}
	}
	if len(p.Identities) > 0 && (!p.RequireTlog || p.TrustedRoot == nil) {
		return fmt.Errorf("policy %q: keyless identities need tlog and a trusted root", p.Name)
	}
	if p.RequireTlog && p.TrustedRoot == nil {
		return fmt.Errorf("policy %q: tlog needs a trusted root", p.Name)
	}
	return nil
}

func (v *Verifier) verify(ctx context.Context, p *policy.Policy, repo, digest string) ([]string, string, error) {
	// One deadline and one byte budget for the whole verification: every
	// request, redirect hop, retry and rate-limit wait below counts.
	ctx, cancel := context.WithTimeout(ctx, v.opts.VerifyTimeout)
	defer cancel()
	if err := checkPolicy(p); err != nil {
		return nil, "", err
	}
	ref, err := policy.ParseReference(repo + "@" + digest)
	if err != nil || ref.Repo != repo || ref.Tag != "" {
		return nil, "", fmt.Errorf("invalid repository or digest %q@%q: %w", repo, digest, err)
	}
	if !strings.HasPrefix(digest, "sha256:") {
		return nil, "", failure(verdict.ReasonInvalidSignature, "cosign signs sha256 digests only, got %s", digest)
	}
	r, err := v.repository(repo)
	if err != nil {
		return nil, "", fmt.Errorf("repository %q: %w", repo, err)
	}
	ctx = withBudget(withRegistry(ctx, r.RegistryStr()), v.opts.MaxVerifyBytes)
	return v.verifyEndpoints(ctx, p, repo, r.Name(), digest)
}

// verifyAt fetches and checks the signatures of digest at one endpoint's
// repository r. signedAs are the repository names the image may have been
// signed under (see knownPayload).
func (v *Verifier) verifyAt(ctx context.Context, p *policy.Policy, r name.Repository, plain bool, digest string, signedAs []string) ([]string, error) {
	puller, err := v.pullerFor(ctx, r, plain)
	if err != nil {
		return nil, err
	}
	d := r.Digest(digest)
	t := newTally(p)

	// Signatures are read and checked one at a time, and dropped before the
	// next is read; the first time the threshold is met ends the search.
	err = v.eachLegacy(ctx, puller, d, signedAs, func(s legacySig) bool {
		v.checkLegacy(ctx, p, s, d, t)
		return t.met()
	})
	if err != nil {
		return nil, err
	}
	if t.met() {
		return t.signers(), nil
	}
	err = v.eachBundle(ctx, puller, d, func(b sigBundle) bool {
		v.checkBundle(ctx, p, b, d, t)
		return t.met()
	})
	if err != nil {
		return nil, err
	}
	if t.met() {
		return t.signers(), nil
	}
	return nil, t.failure()
}

// tally records which actual signers verified under which policy signers,
// and why the other signatures failed. The threshold is met when a maximum
// matching between actual signers and policy signers (keys first, then
// keyless identities) has at least threshold pairs: each actual signer
// counts once, for one policy signer, and the order in which signatures are
// examined does not matter. The legacy and the bundle paths feed the same
// tally.
type tally struct {
	threshold int
	policy    int                       // number of policy signers
	who       []string                  // actual signers, in the order first seen
	edges     map[string]map[int]string // actual signer -> policy signer -> label
	matched   []string                  // labels of the current maximum matching
	dirty     bool                      // edges changed since matched was computed
	seen      int                       // signatures and bundles examined
	reasons   map[string]int
	last      map[string]error
}

func newTally(p *policy.Policy) *tally {
	return &tally{threshold: p.Threshold, policy: len(p.Keys) + len(p.Identities),
		edges: map[string]map[int]string{}, reasons: map[string]int{}, last: map[string]error{}}
}

// ok records that actual signer who (a key ID, or a certificate's issuer
// and SANs) made a signature that policy signer number signer accepts;
// label is what Signers reports for the pair.
func (t *tally) ok(who string, signer int, label string) {
	e, found := t.edges[who]
	if !found {
		e = map[int]string{}
		t.edges[who] = e
		t.who = append(t.who, who)
	}
	if _, dup := e[signer]; !dup {
		e[signer] = label
		t.dirty = true
	}
}

// has reports whether who is already known to satisfy policy signer signer
// (another signature by who need not be checked against it).
func (t *tally) has(who string, signer int) bool {
	_, ok := t.edges[who][signer]
	return ok
}

func (t *tally) fail(err *FailureError) {
	t.reasons[err.Reason]++
	t.last[err.Reason] = err
}

// match computes a maximum bipartite matching with augmenting paths
// (Kuhn's algorithm): at most MaxSignatures+MaxReferrers actual signers
// against the policy's handful of signers, so exact and cheap.
func (t *tally) match() []string {
	if !t.dirty && t.matched != nil {
		return t.matched
	}
	owner := make([]int, t.policy) // policy signer -> index in t.who, or -1
	for i := range owner {
		owner[i] = -1
	}
	var try func(u int, visited []bool) bool
	try = func(u int, visited []bool) bool {
		for j := range t.policy {
			if _, ok := t.edges[t.who[u]][j]; !ok || visited[j] {
				continue
			}
			visited[j] = true
			if owner[j] < 0 || try(owner[j], visited) {
				owner[j] = u
				return true
			}
		}
		return false
	}
	for u := range t.who {
		try(u, make([]bool, t.policy))
	}
	out := []string{}
	for j, u := range owner {
		if u >= 0 {
			out = append(out, t.edges[t.who[u]][j])
		}
	}
	slices.Sort(out)
	t.matched, t.dirty = out, false
	return out
}

func (t *tally) met() bool { return len(t.match()) >= t.threshold }

// signers are the labels of the matched pairs, sorted.
func (t *tally) signers() []string { return slices.Compact(slices.Clone(t.match())) }

// reasonPriority: the most specific explanation wins when several signatures
// failed for different reasons.
var reasonPriority = []string{
	verdict.ReasonTooLarge, verdict.ReasonDigestMismatch, verdict.ReasonTlogMissing,
	verdict.ReasonIdentityMismatch, verdict.ReasonInvalidSignature,
}

func (t *tally) failure() error {
	if m := t.match(); len(m) > 0 {
		return failure(verdict.ReasonThresholdNotMet, "%d of %d required signers verified (%s)",
			len(m), t.threshold, strings.Join(t.signers(), ", "))
	}
	if t.seen == 0 {
		return failure(verdict.ReasonNoSignature, "no signatures found")
	}
	for _, r := range reasonPriority {
		if t.reasons[r] > 0 {
			return &FailureError{Reason: r, Err: fmt.Errorf("%d signature(s) examined, none acceptable: %w", t.seen, t.last[r])}
		}
	}
	return failure(verdict.ReasonInvalidSignature, "%d signature(s) examined, none acceptable", t.seen)
}

// Resolve returns the digest that ref names: ref.Digest when set, otherwise
// the digest the registry reports for the tag ("latest" when none).
func (v *Verifier) Resolve(ctx context.Context, ref policy.Ref) (string, error) {
	if ref.Digest != "" {
		if err := policy.ValidateDigest(ref.Digest); err != nil {
			return "", err
		}
		return ref.Digest, nil
	}
	r, err := v.repository(ref.Repo)
	if err != nil {
		return "", fmt.Errorf("repository %q: %w", ref.Repo, err)
	}
	tag := ref.Tag
	if tag == "" {
		tag = "latest"
	}
	ctx, cancel := context.WithTimeout(ctx, v.opts.VerifyTimeout)
	defer cancel()
	ctx = withRegistry(ctx, r.RegistryStr())
	puller, err := remote.NewPuller(v.remoteOptions(ctx)...)
	if err != nil {
		return "", fmt.Errorf("registry client: %w", err)
	}
	t := r.Tag(tag)
	desc, err := puller.Head(ctx, t)
	if err != nil && !isNotFound(err) {
		// Some registries refuse HEAD; fall back to GET.
		var gd *remote.Descriptor
		if gd, err = puller.Get(ctx, t); err == nil {
			desc = &gd.Descriptor
		}
	}
	if err != nil {
		return "", classifyFetch("resolve "+t.String(), err)
	}
	if err := policy.ValidateDigest(desc.Digest.String()); err != nil {
		return "", &RegistryError{Err: fmt.Errorf("resolve %s: %w", t, err)}
	}
	return desc.Digest.String(), nil
}
