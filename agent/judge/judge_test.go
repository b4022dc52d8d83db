package judge_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"go.uber.org/goleak"

	"github.com/pinwarden/pinwarden/agent/cache"
	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/judge"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	digestA     = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	digestB     = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	internal    = "registry.example.com/shop/api"
	verifiedTTL = 24 * time.Hour
	failedTTL   = 10 * time.Minute
)

// clock is a settable fake clock shared by the judge and the cache.
type clock struct {
	mu sync.Mutex // guards t
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// fakeVerifier answers with a scripted result and counts calls.
type fakeVerifier struct {
	mu     sync.Mutex // guards every field below
	result func(p *policy.Policy, repo, digest string) verdict.Result
	calls  int
	seen   []string // policy names verified with
	// onVerify, if set, runs inside Verify (e.g. to advance the clock).
	onVerify func()
}

func (f *fakeVerifier) Verify(_ context.Context, p *policy.Policy, repo, digest string) verdict.Result {
	f.mu.Lock()
	f.calls++
	f.seen = append(f.seen, p.Name)
	res, on := f.result, f.onVerify
	f.mu.Unlock()
	if on != nil {
		on()
	}
	return res(p, repo, digest)
}

func (f *fakeVerifier) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func returns(v verdict.Verdict, reason string, signers ...string) func(*policy.Policy, string, string) verdict.Result {
	return func(_ *policy.Policy, _, _ string) verdict.Result {
		return verdict.Result{Verdict: v, Reason: reason, Signers: signers}
	}
}

type observed struct {
	r    verdict.Result
	took time.Duration
}

type fakeObserver struct {
	mu  sync.Mutex // guards got
	got []observed
}

func (o *fakeObserver) Verification(r verdict.Result, took time.Duration) {
	o.mu.Lock()
	o.got = append(o.got, observed{r, took})
	o.mu.Unlock()
}

func (o *fakeObserver) All() []observed {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]observed(nil), o.got...)
}

func writeKey(t *testing.T, dir, name string) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pem, err := cryptoutils.MarshalPublicKeyToPEM(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, pem, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// compile builds the test policy set: docker.io denied, pause ignored,
// registry.example.com verified with keyPath.
func compile(t *testing.T, keyPath string) *policy.Set {
	t.Helper()
	y := fmt.Sprintf(`
policies:
- name: public
  images: ["docker.io/**"]
  deny: true
- name: pause
  images: ["registry.k8s.io/pause"]
  ignore: true
- name: internal
  images: ["registry.example.com/**"]
  keys: [%q]
`, keyPath)
	return compileYAML(t, y)
}

func compileYAML(t *testing.T, y string) *policy.Set {
	t.Helper()
	cfg, err := config.Parse([]byte(y), "")
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	s, err := policy.Compile(cfg)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	return s
}

type fixture struct {
	set   *policy.Set
	key   string
	clock *clock
	cache *cache.Cache
	v     *fakeVerifier
	obs   *fakeObserver
	j     *judge.Judge
}

func newFixture(t *testing.T, result func(*policy.Policy, string, string) verdict.Result) *fixture {
	t.Helper()
	dir := t.TempDir()
	f := &fixture{key: writeKey(t, dir, "ci.pub"), clock: newClock(), v: &fakeVerifier{result: result}, obs: &fakeObserver{}}
	f.set = compile(t, f.key)
	c, err := cache.Open(t.Context(), cache.PathIn(filepath.Join(dir, "state")), cache.WithClock(f.clock.Now))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	})
	f.cache = c
	f.j = judge.New(f.set, f.v, judge.WithCache(c, verifiedTTL, failedTTL),
		judge.WithObserver(f.obs), judge.WithClock(f.clock.Now))
	return f
}

func policyNamed(t *testing.T, s *policy.Set, name string) *policy.Policy {
	t.Helper()
	for _, p := range s.Policies {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("no policy %s", name)
	return nil
}

func TestJudgeStaticVerdicts(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		repo        string
		wantVerdict verdict.Verdict
		wantReason  string
		wantPolicy  string
	}{
		{"deny policy", "docker.io/library/nginx", verdict.Untrusted, verdict.ReasonDenied, "public"},
		{"ignore policy", "registry.k8s.io/pause", verdict.Ignored, "", "pause"},
		{"no matching policy", "quay.io/someone/tool", verdict.Untrusted, verdict.ReasonNoPolicy, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, returns(verdict.Verified, ""))
			for i := range 2 {
				r := f.j.Judge(t.Context(), tt.repo, digestA)
				if r.Verdict != tt.wantVerdict || r.Reason != tt.wantReason || r.Policy != tt.wantPolicy {
					t.Fatalf("call %d: got %s/%s policy %q, want %s/%s policy %q",
						i, r.Verdict, r.Reason, r.Policy, tt.wantVerdict, tt.wantReason, tt.wantPolicy)
				}
				if r.Digest != digestA {
					t.Errorf("digest %q, want %s", r.Digest, digestA)
				}
				if !r.VerifiedAt.Equal(f.clock.Now()) {
					t.Errorf("VerifiedAt %v, want the judge's clock %v", r.VerifiedAt, f.clock.Now())
				}
				if tt.wantPolicy != "" {
					if want := policyNamed(t, f.set, tt.wantPolicy).Fingerprint; r.Fingerprint != want {
						t.Errorf("fingerprint %q, want %q", r.Fingerprint, want)
					}
				} else if r.Fingerprint != "" {
					t.Errorf("no-policy verdict carries fingerprint %q", r.Fingerprint)
				}
			}
			if n := f.v.Calls(); n != 0 {
				t.Errorf("verifier called %d times for a static verdict", n)
			}
			if n := len(f.obs.All()); n != 2 {
				t.Errorf("observer saw %d results, want 2", n)
			}
		})
	}
}

func TestJudgeVerifiesAndCaches(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		result     verdict.Result
		wantCached bool
	}{
		{"verified is cached", verdict.Result{Verdict: verdict.Verified, Signers: []string{"sha256:k1"}}, true},
		{"unverified is cached", verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonNoSignature}, true},
		{"unverified too-large is cached (issue 10: a hostile .sig is judged once)", verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonTooLarge}, true},
		{"untrusted from verifier is cached", verdict.Result{Verdict: verdict.Untrusted, Reason: verdict.ReasonDenied}, true},
		{"pending registry error is not cached", verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryError}, false},
		{"pending registry unreachable is not cached", verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryUnreachable}, false},
		{"empty verdict is not cached", verdict.Result{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, func(*policy.Policy, string, string) verdict.Result { return tt.result })
			p := policyNamed(t, f.set, "internal")

			first := f.j.Judge(t.Context(), internal, digestA)
			if first.Verdict != tt.result.Verdict || first.Reason != tt.result.Reason {
				t.Fatalf("first: %s/%s, want %s/%s", first.Verdict, first.Reason, tt.result.Verdict, tt.result.Reason)
			}
			if first.Source != verdict.SourceRegistry || first.Digest != digestA || first.Policy != "internal" ||
				first.Fingerprint != p.Fingerprint {
				t.Errorf("first: source %q digest %q policy %q fp %q; want registry %s internal %s",
					first.Source, first.Digest, first.Policy, first.Fingerprint, digestA, p.Fingerprint)
			}
			if first.VerifiedAt.IsZero() {
				t.Error("first: VerifiedAt not set")
			}
			if _, ok := f.cache.Get(digestA, p.Fingerprint); ok != tt.wantCached {
				t.Errorf("cache holds the verdict: %v, want %v", ok, tt.wantCached)
			}

			second := f.j.Judge(t.Context(), internal, digestA)
			wantCalls, wantSource := 2, verdict.SourceRegistry
			if tt.wantCached {
				wantCalls, wantSource = 1, verdict.SourceCache
			}
			if n := f.v.Calls(); n != wantCalls {
				t.Errorf("verifier calls = %d, want %d", n, wantCalls)
			}
			if second.Source != wantSource || second.Verdict != tt.result.Verdict || second.Reason != tt.result.Reason {
				t.Errorf("second: %s/%s source %s, want %s/%s source %s",
					second.Verdict, second.Reason, second.Source, tt.result.Verdict, tt.result.Reason, wantSource)
			}
			if second.Policy != "internal" || second.Fingerprint != p.Fingerprint || second.Digest != digestA {
				t.Errorf("second: policy %q fp %q digest %q", second.Policy, second.Fingerprint, second.Digest)
			}
			if len(second.Signers) != len(tt.result.Signers) {
				t.Errorf("second: signers %v, want %v", second.Signers, tt.result.Signers)
			}

			// Another digest is never answered from the first one's entry.
			f.j.Judge(t.Context(), internal, digestB)
			if n := f.v.Calls(); n != wantCalls+1 {
				t.Errorf("verifier calls after another digest = %d, want %d", n, wantCalls+1)
			}
		})
	}
}

func TestJudgeTTLExpiry(t *testing.T) {
	t.Parallel()
	// The TTLs differ (24h vs 10m), so mixing them up fails one of the rows.
	tests := []struct {
		name   string
		result verdict.Result
		ttl    time.Duration
	}{
		{"verified lives verifiedTTL", verdict.Result{Verdict: verdict.Verified}, verifiedTTL},
		{"unverified lives failedTTL", verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonInvalidSignature}, failedTTL},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, func(*policy.Policy, string, string) verdict.Result { return tt.result })
			f.j.Judge(t.Context(), internal, digestA)
			if n := f.v.Calls(); n != 1 {
				t.Fatalf("calls = %d, want 1", n)
			}
			// Past the shorter TTL, still inside this row's TTL.
			f.clock.Advance(min(tt.ttl, failedTTL) - time.Second)
			if r := f.j.Judge(t.Context(), internal, digestA); r.Source != verdict.SourceCache {
				t.Errorf("before expiry: source %s, want cache", r.Source)
			}
			if tt.ttl > failedTTL {
				f.clock.Advance(2 * time.Second) // past failedTTL only
				if r := f.j.Judge(t.Context(), internal, digestA); r.Source != verdict.SourceCache {
					t.Errorf("past failedTTL but within %v: source %s, want cache", tt.ttl, r.Source)
				}
			}
			if n := f.v.Calls(); n != 1 {
				t.Fatalf("calls before expiry = %d, want 1", n)
			}
			f.clock.Advance(tt.ttl) // well past this row's TTL
			r := f.j.Judge(t.Context(), internal, digestA)
			if r.Source != verdict.SourceRegistry || r.Verdict != tt.result.Verdict {
				t.Errorf("after expiry: %s source %s, want %s from registry", r.Verdict, r.Source, tt.result.Verdict)
			}
			if !r.VerifiedAt.Equal(f.clock.Now()) {
				t.Errorf("re-verified at %v, want %v", r.VerifiedAt, f.clock.Now())
			}
			if n := f.v.Calls(); n != 2 {
				t.Errorf("calls after expiry = %d, want 2", n)
			}
			// The fresh verdict is cached again.
			if r := f.j.Judge(t.Context(), internal, digestA); r.Source != verdict.SourceCache {
				t.Errorf("after re-verification: source %s, want cache", r.Source)
			}
		})
	}
}

func TestJudgePendingThenDefinitive(t *testing.T) {
	t.Parallel()
	// The registry fails twice, then the signature verifies: the pending
	// verdicts are never served from the cache, and never read as verified.
	var mu sync.Mutex
	script := []verdict.Result{
		{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryUnreachable},
		{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryError},
		{Verdict: verdict.Verified, Signers: []string{"sha256:k1"}},
	}
	f := newFixture(t, func(*policy.Policy, string, string) verdict.Result {
		mu.Lock()
		defer mu.Unlock()
		r := script[0]
		if len(script) > 1 {
			script = script[1:]
		}
		return r
	})
	want := []struct {
		verdict verdict.Verdict
		source  verdict.Source
		calls   int
	}{
		{verdict.Pending, verdict.SourceRegistry, 1},
		{verdict.Pending, verdict.SourceRegistry, 2},
		{verdict.Verified, verdict.SourceRegistry, 3},
		{verdict.Verified, verdict.SourceCache, 3},
	}
	for i, w := range want {
		r := f.j.Judge(t.Context(), internal, digestA)
		if r.Verdict != w.verdict || r.Source != w.source || f.v.Calls() != w.calls {
			t.Errorf("judgement %d: %s/%s source %s after %d calls; want %s source %s after %d",
				i, r.Verdict, r.Reason, r.Source, f.v.Calls(), w.verdict, w.source, w.calls)
		}
		if r.Verdict == verdict.Pending && r.Definitive() {
			t.Errorf("judgement %d: pending result is definitive", i)
		}
	}
}

func TestJudgeCancelledContext(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		result      verdict.Result
		wantVerdict verdict.Verdict
		wantReason  string
		wantCached  bool
	}{
		// A verifier cut short reports whatever it saw last; that is not a
		// judgement of the image.
		{"unverified becomes pending", verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonNoSignature},
			verdict.Pending, verdict.ReasonQueued, false},
		{"untrusted becomes pending", verdict.Result{Verdict: verdict.Untrusted, Reason: verdict.ReasonDenied},
			verdict.Pending, verdict.ReasonQueued, false},
		{"verified stays verified", verdict.Result{Verdict: verdict.Verified},
			verdict.Verified, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, func(*policy.Policy, string, string) verdict.Result { return tt.result })
			ctx, cancel := context.WithCancel(t.Context())
			cancel()
			r := f.j.Judge(ctx, internal, digestA)
			if r.Verdict != tt.wantVerdict || r.Reason != tt.wantReason {
				t.Errorf("got %s/%s, want %s/%s", r.Verdict, r.Reason, tt.wantVerdict, tt.wantReason)
			}
			if _, ok := f.cache.Get(digestA, policyNamed(t, f.set, "internal").Fingerprint); ok != tt.wantCached {
				t.Errorf("cached = %v, want %v", ok, tt.wantCached)
			}
		})
	}
}

func TestJudgePolicyChange(t *testing.T) {
	t.Parallel()
	f := newFixture(t, returns(verdict.Verified, "", "sha256:k1"))
	oldFP := policyNamed(t, f.set, "internal").Fingerprint

	if r := f.j.Judge(t.Context(), internal, digestA); r.Verdict != verdict.Verified || r.Fingerprint != oldFP {
		t.Fatalf("under the old policy: %+v", r)
	}

	// Same policy names, another key: a new fingerprint for "internal".
	newSet := compile(t, writeKey(t, t.TempDir(), "rotated.pub"))
	newFP := policyNamed(t, newSet, "internal").Fingerprint
	if newFP == oldFP {
		t.Fatal("fingerprint did not change with the key")
	}
	f.j.SetPolicies(newSet)
	if f.j.Policies() != newSet {
		t.Error("Policies() does not return the new set")
	}
	r := f.j.Judge(t.Context(), internal, digestA)
	if r.Source != verdict.SourceRegistry || r.Fingerprint != newFP {
		t.Errorf("after the change: source %s fp %s, want a registry verdict under %s", r.Source, r.Fingerprint, newFP)
	}
	if n := f.v.Calls(); n != 2 {
		t.Errorf("verifier calls = %d, want 2 (the old verdict must not be served)", n)
	}
	if r := f.j.Judge(t.Context(), internal, digestA); r.Source != verdict.SourceCache || r.Fingerprint != newFP {
		t.Errorf("second judgement under the new policy: source %s fp %s", r.Source, r.Fingerprint)
	}

	// A policy that now denies the repository wins over any cached verdict.
	denySet := compileYAML(t, `
policies:
- name: internal
  images: ["registry.example.com/**"]
  deny: true
`)
	f.j.SetPolicies(denySet)
	if r := f.j.Judge(t.Context(), internal, digestA); r.Verdict != verdict.Untrusted || r.Reason != verdict.ReasonDenied {
		t.Errorf("after deny: %s/%s, want untrusted/denied", r.Verdict, r.Reason)
	}
	// And no policy at all: no-policy, whatever the cache holds.
	f.j.SetPolicies(compileYAML(t, "policies: []\n"))
	if r := f.j.Judge(t.Context(), internal, digestA); r.Verdict != verdict.Untrusted || r.Reason != verdict.ReasonNoPolicy {
		t.Errorf("after removing every policy: %s/%s, want untrusted/no-policy", r.Verdict, r.Reason)
	}
	if n := f.v.Calls(); n != 2 {
		t.Errorf("verifier calls = %d, want 2", n)
	}
}

func TestJudgeObserver(t *testing.T) {
	t.Parallel()
	f := newFixture(t, returns(verdict.Verified, ""))
	f.v.onVerify = func() { f.clock.Advance(3 * time.Second) }

	f.j.Judge(t.Context(), internal, digestA)              // registry, 3s
	f.j.Judge(t.Context(), internal, digestA)              // cache
	f.j.Judge(t.Context(), "docker.io/library/x", digestB) // denied

	got := f.obs.All()
	want := []struct {
		verdict verdict.Verdict
		source  verdict.Source
		digest  string
		took    time.Duration
	}{
		{verdict.Verified, verdict.SourceRegistry, digestA, 3 * time.Second},
		{verdict.Verified, verdict.SourceCache, digestA, 0},
		{verdict.Untrusted, "", digestB, 0},
	}
	if len(got) != len(want) {
		t.Fatalf("observer saw %d results, want %d: %+v", len(got), len(want), got)
	}
	for i, w := range want {
		if got[i].r.Verdict != w.verdict || got[i].r.Source != w.source || got[i].r.Digest != w.digest || got[i].took != w.took {
			t.Errorf("observation %d: %s source %q digest %s took %v; want %s source %q digest %s took %v",
				i, got[i].r.Verdict, got[i].r.Source, got[i].r.Digest, got[i].took, w.verdict, w.source, w.digest, w.took)
		}
	}
}

func TestJudgeWithoutCache(t *testing.T) {
	t.Parallel()
	set := compile(t, writeKey(t, t.TempDir(), "ci.pub"))
	v := &fakeVerifier{result: returns(verdict.Verified, "")}
	j := judge.New(set, v)
	for range 3 {
		if r := j.Judge(t.Context(), internal, digestA); r.Source != verdict.SourceRegistry || r.Verdict != verdict.Verified {
			t.Errorf("got %s source %s", r.Verdict, r.Source)
		}
	}
	if n := v.Calls(); n != 3 {
		t.Errorf("verifier calls = %d, want 3 without a cache", n)
	}
}

// TestJudgeConcurrentPolicySwap runs judgements while the policies change,
// for the race detector, and checks every result is consistent with one of
// the two sets.
func TestJudgeConcurrentPolicySwap(t *testing.T) {
	t.Parallel()
	f := newFixture(t, func(p *policy.Policy, _, _ string) verdict.Result {
		return verdict.Result{Verdict: verdict.Verified, Signers: []string{p.Fingerprint}}
	})
	other := compile(t, writeKey(t, t.TempDir(), "other.pub"))
	fps := map[string]bool{
		policyNamed(t, f.set, "internal").Fingerprint: true,
		policyNamed(t, other, "internal").Fingerprint: true,
	}
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 50 {
				d := fmt.Sprintf("sha256:%064x", w*1000+i%5)
				r := f.j.Judge(t.Context(), internal, d)
				if r.Verdict != verdict.Verified || !fps[r.Fingerprint] || len(r.Signers) != 1 || r.Signers[0] != r.Fingerprint {
					t.Errorf("inconsistent result %+v", r)
					return
				}
			}
		})
	}
	wg.Go(func() {
		for i := range 50 {
			if i%2 == 0 {
				f.j.SetPolicies(other)
			} else {
				f.j.SetPolicies(f.set)
			}
		}
	})
	wg.Wait()
}

// TestJudgeSetVerifier: a reload with new registry credentials swaps the
// verifier; the next uncached judgement uses the new one.
func TestJudgeSetVerifier(t *testing.T) {
	t.Parallel()
	set := compile(t, writeKey(t, t.TempDir(), "ci.pub"))
	old := &fakeVerifier{result: returns(verdict.Pending, verdict.ReasonRegistryError)}
	cur := &fakeVerifier{result: returns(verdict.Verified, "")}
	j := judge.New(set, old)
	if r := j.Judge(t.Context(), internal, digestA); r.Verdict != verdict.Pending {
		t.Fatalf("old verifier: %s", r.Verdict)
	}
	j.SetVerifier(cur)
	if r := j.Judge(t.Context(), internal, digestA); r.Verdict != verdict.Verified {
		t.Fatalf("new verifier: %s", r.Verdict)
	}
	if old.Calls() != 1 || cur.Calls() != 1 {
		t.Errorf("calls old %d new %d, want 1 and 1", old.Calls(), cur.Calls())
	}
}

// TestJudgeUnavailablePolicies: while the config's files are missing every
// digest is pending and the verifier is never asked.
func TestJudgeUnavailablePolicies(t *testing.T) {
	t.Parallel()
	v := &fakeVerifier{result: returns(verdict.Verified, "")}
	j := judge.New(policy.Unavailable(errors.New("key missing")), v)
	if r := j.Judge(t.Context(), internal, digestA); r.Verdict != verdict.Pending || r.Digest != digestA {
		t.Fatalf("got %+v", r)
	}
	if v.Calls() != 0 {
		t.Error("verifier asked without policies")
	}
}
