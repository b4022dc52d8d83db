package prefetch_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/prefetch"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/cri"
)

// fakeJudge answers from a function of the digest and counts calls.
type fakeJudge struct {
	mu     sync.Mutex
	calls  map[string]int
	answer func(digest string, call int) verdict.Result
}

func (j *fakeJudge) Judge(ctx context.Context, repo, digest string) verdict.Result {
	j.mu.Lock()
	if j.calls == nil {
		j.calls = map[string]int{}
	}
	j.calls[digest]++
	n := j.calls[digest]
	j.mu.Unlock()
	r := j.answer(digest, n)
	r.Digest = digest
	return r
}

// fakeRuntime is an in-memory image store whose pulls take pullTime.
type fakeRuntime struct {
	pullTime time.Duration
	pullErr  error

	mu          sync.Mutex
	images      map[string]bool // ref -> present
	pinned      map[string]bool
	pulls       []string
	auths       map[string]*cri.Auth
	inflight    int
	maxInflight int
	byDigest    map[string]int
	overlap     bool // two pulls of one digest at once
}

func newFakeRuntime() *fakeRuntime {
	return &fakeRuntime{images: map[string]bool{}, pinned: map[string]bool{}, auths: map[string]*cri.Auth{}, byDigest: map[string]int{}}
}

func (r *fakeRuntime) ImageStatus(_ context.Context, ref string) (*cri.Image, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.images[ref] {
		return nil, nil
	}
	return &cri.Image{ID: "id-" + ref, Pinned: r.pinned[ref]}, nil
}

func (r *fakeRuntime) PullImage(ctx context.Context, ref string, auth *cri.Auth) (string, error) {
	_, digest, _ := strings.Cut(ref, "@")
	r.mu.Lock()
	r.inflight++
	r.maxInflight = max(r.maxInflight, r.inflight)
	r.byDigest[digest]++
	if r.byDigest[digest] > 1 {
		r.overlap = true
	}
	r.auths[ref] = auth
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.inflight--
		r.byDigest[digest]--
		r.mu.Unlock()
	}()
	select {
	case <-time.After(r.pullTime):
	case <-ctx.Done():
		return "", ctx.Err()
	}
	if r.pullErr != nil {
		return "", r.pullErr
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.images[ref] = true
	r.pulls = append(r.pulls, ref)
	return "id-" + ref, nil
}

func (r *fakeRuntime) PinImage(_ context.Context, name string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.images[name] {
		return cri.ErrNotFound
	}
	r.pinned[name] = true
	return nil
}

func (r *fakeRuntime) pulled() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.pulls)
}

// recorder is an Observer and an Events sink.
type recorder struct {
	mu      sync.Mutex
	results map[string]int
	pending int
	events  []string // "type reason"
}

func (r *recorder) Prefetch(result string, _ time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.results == nil {
		r.results = map[string]int{}
	}
	r.results[result]++
}

func (r *recorder) PrefetchPending(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pending = n
}

func (r *recorder) Event(eventtype, reason, _ string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, eventtype+" "+reason)
}

func (r *recorder) snapshot() (map[string]int, int, []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := map[string]int{}
	for k, v := range r.results {
		m[k] = v
	}
	return m, r.pending, slices.Clone(r.events)
}

func pin(t *testing.T, repo string, n int) pins.Pin {
	t.Helper()
	p, err := pins.ParseReference(fmt.Sprintf("%s@sha256:%064x", repo, n))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func answer(v verdict.Verdict, reason string) func(string, int) verdict.Result {
	return func(string, int) verdict.Result { return verdict.Result{Verdict: v, Reason: reason} }
}

func TestOnce(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		present     bool
		answer      func(string, int) verdict.Result
		wantResult  string
		wantPull    bool
		wantEvent   string
		wantJudged  int
		wantPinned  bool
		wantAttempt int
	}{
		{"present is not judged", true, answer(verdict.Verified, ""), prefetch.ResultPresent, false, "", 0, true, 1},
		{"verified is pulled", false, answer(verdict.Verified, ""), prefetch.ResultPulled, true, "Normal ImagePrefetched", 1, true, 1},
		{"ignored is pulled", false, answer(verdict.Ignored, ""), prefetch.ResultPulled, true, "Normal ImagePrefetched", 1, true, 1},
		{"unverified is rejected", false, answer(verdict.Unverified, verdict.ReasonNoSignature), prefetch.ResultRejected, false, "Warning ImagePrefetchFailed", 1, false, 1},
		{"untrusted is rejected", false, answer(verdict.Untrusted, verdict.ReasonNoPolicy), prefetch.ResultRejected, false, "Warning ImagePrefetchFailed", 1, false, 1},
		{"pending is retried then fails", false, answer(verdict.Pending, verdict.ReasonRegistryUnreachable), prefetch.ResultFailed, false, "Warning ImagePrefetchFailed", 3, false, 3},
		{"pending then verified is pulled", false, func(_ string, n int) verdict.Result {
			if n < 2 {
				return verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryUnreachable}
			}
			return verdict.Result{Verdict: verdict.Verified}
		}, prefetch.ResultPulled, true, "Normal ImagePrefetched", 2, true, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				rt := newFakeRuntime()
				p := pin(t, "registry.example.com/app", 1)
				if tt.present {
					rt.images[p.Ref()] = true
				}
				j := &fakeJudge{answer: tt.answer}
				rec := &recorder{}
				pf := prefetch.New(j, rt, nil, prefetch.Options{PinGC: true, Observer: rec, Events: rec})
				var phases []string
				out := pf.Once(t.Context(), []pins.Pin{p}, func(ev prefetch.Event) { phases = append(phases, ev.Phase) })
				if len(out) != 1 || out[0].Result != tt.wantResult || out[0].Attempts != tt.wantAttempt {
					t.Fatalf("Once = %+v, want result %s after %d attempts", out, tt.wantResult, tt.wantAttempt)
				}
				if got := len(rt.pulled()) > 0; got != tt.wantPull {
					t.Errorf("pulled = %v, want %v", rt.pulled(), tt.wantPull)
				}
				if j.calls[p.Digest] != tt.wantJudged {
					t.Errorf("judged %d times, want %d", j.calls[p.Digest], tt.wantJudged)
				}
				if rt.pinned[p.Ref()] != tt.wantPinned {
					t.Errorf("pinned = %v, want %v", rt.pinned[p.Ref()], tt.wantPinned)
				}
				res, _, evs := rec.snapshot()
				if res[tt.wantResult] != 1 {
					t.Errorf("metrics %v, want one %s", res, tt.wantResult)
				}
				if tt.wantEvent == "" && len(evs) > 0 || tt.wantEvent != "" && !slices.Equal(evs, []string{tt.wantEvent}) {
					t.Errorf("events %v, want %q", evs, tt.wantEvent)
				}
				if phases[len(phases)-1] != tt.wantResult {
					t.Errorf("last progress phase %v, want %s", phases, tt.wantResult)
				}
				if tt.wantPull && !slices.Contains(phases, prefetch.PhasePulling) {
					t.Errorf("phases %v lack %s", phases, prefetch.PhasePulling)
				}
			})
		})
	}
}

// TestRun: Run follows SetPins live, retries pending with backoff, never
// pulls a rejected pin, sends one warning per transition, and stops retrying
// a removed pin.
func TestRun(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		rt := newFakeRuntime()
		rt.pullTime = time.Second
		good, bad, flaky, gone := pin(t, "r.example/good", 1), pin(t, "r.example/bad", 2), pin(t, "r.example/flaky", 3), pin(t, "r.example/gone", 4)
		j := &fakeJudge{answer: func(d string, n int) verdict.Result {
			switch d {
			case bad.Digest:
				return verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonNoSignature}
			case flaky.Digest:
				if n <= 3 {
					return verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryUnreachable}
				}
			case gone.Digest:
				return verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryUnreachable}
			}
			return verdict.Result{Verdict: verdict.Verified}
		}}
		rec := &recorder{}
		pf := prefetch.New(j, rt, nil, prefetch.Options{Concurrency: 2, RetryBase: time.Second, RetryMax: 10 * time.Second,
			Recheck: time.Hour, Observer: rec, Events: rec})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- pf.Run(ctx) }()
		synctest.Wait()
		if err := pf.Run(ctx); err == nil {
			t.Error("a second Run must fail")
		}

		pf.SetPins([]pins.Pin{bad, gone})
		time.Sleep(5 * time.Second)
		synctest.Wait()
		pf.SetPins([]pins.Pin{good, bad, flaky}) // gone removed, good and flaky added live
		time.Sleep(time.Minute)
		synctest.Wait()

		if got := rt.pulled(); !slices.Equal(sorted(got), sorted([]string{good.Ref(), flaky.Ref()})) {
			t.Errorf("pulled %v, want good and flaky", got)
		}
		j.mu.Lock()
		goneCalls, flakyCalls, badCalls := j.calls[gone.Digest], j.calls[flaky.Digest], j.calls[bad.Digest]
		j.mu.Unlock()
		if flakyCalls != 4 {
			t.Errorf("flaky judged %d times, want 4 (3 pending, then verified)", flakyCalls)
		}
		if badCalls != 2 {
			t.Errorf("bad judged %d times, want 2 (first, then again after SetPins)", badCalls)
		}
		// gone was retried with backoff for 5s (at 0, 1-1.1s and 3-3.3s:
		// waits of 1s and 2s plus up to 10%), then never again.
		if goneCalls != 3 {
			t.Errorf("gone judged %d times in 5s with a 1s doubling backoff, want 3", goneCalls)
		}
		res, pending, evs := rec.snapshot()
		if res[prefetch.ResultPulled] != 2 || res[prefetch.ResultRejected] != 2 {
			t.Errorf("metrics %v", res)
		}
		if pending != 1 {
			t.Errorf("pending gauge %d, want 1 (bad)", pending)
		}
		want := map[string]int{"Normal ImagePrefetched": 2, "Warning ImagePrefetchFailed": 3} // bad, gone, flaky once each
		got := map[string]int{}
		for _, e := range evs {
			got[e]++
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("events %v, want %v", got, want)
		}
		if rt.maxInflight > 2 {
			t.Errorf("%d pulls at once, concurrency is 2", rt.maxInflight)
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	})
}

// TestRunCancelsRemovedPin: removing a pin cancels its pull in flight.
func TestRunCancelsRemovedPin(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		rt := newFakeRuntime()
		rt.pullTime = time.Hour
		p := pin(t, "r.example/slow", 1)
		pf := prefetch.New(&fakeJudge{answer: answer(verdict.Verified, "")}, rt, nil, prefetch.Options{})
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		done := make(chan error)
		go func() { done <- pf.Run(ctx) }()
		pf.SetPins([]pins.Pin{p})
		time.Sleep(time.Second)
		synctest.Wait()
		rt.mu.Lock()
		inflight := rt.inflight
		rt.mu.Unlock()
		if inflight != 1 {
			t.Fatalf("%d pulls in flight, want 1", inflight)
		}
		pf.SetPins(nil)
		synctest.Wait()
		rt.mu.Lock()
		inflight = rt.inflight
		rt.mu.Unlock()
		if inflight != 0 {
			t.Errorf("pull of a removed pin still running")
		}
		cancel()
		<-done
	})
}

// TestConcurrencyAndDedup: at most Concurrency pins at once, and one digest
// pinned in two repositories is never pulled twice at once.
func TestConcurrencyAndDedup(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		rt := newFakeRuntime()
		rt.pullTime = time.Second
		var ps []pins.Pin
		for i := range 10 {
			ps = append(ps, pin(t, fmt.Sprintf("r.example/app%d", i), i%5)) // each digest in two repos
		}
		pf := prefetch.New(&fakeJudge{answer: answer(verdict.Verified, "")}, rt, nil, prefetch.Options{Concurrency: 3})
		out := pf.Once(t.Context(), ps, nil)
		for _, o := range out {
			if o.Result != prefetch.ResultPulled {
				t.Errorf("%s: %s %s", o.Pin, o.Result, o.Detail)
			}
		}
		if rt.maxInflight != 3 {
			t.Errorf("max pulls at once %d, want 3", rt.maxInflight)
		}
		if rt.overlap {
			t.Error("one digest was pulled twice at once")
		}
	})
}

type creds map[string]authn.AuthConfig

func (c creds) Credentials(host string) (authn.AuthConfig, bool) { a, ok := c[host]; return a, ok }

// TestCredentialsOnlyForThePinsHost: a pull carries the credentials of its
// own registry host and no other.
func TestCredentialsOnlyForThePinsHost(t *testing.T) {
	t.Parallel()
	rt := newFakeRuntime()
	a, b, hub := pin(t, "a.example:5000/x", 1), pin(t, "b.example/y", 2), pin(t, "nginx", 3)
	pf := prefetch.New(&fakeJudge{answer: answer(verdict.Verified, "")}, rt, nil, prefetch.Options{Credentials: creds{
		"a.example:5000": {Username: "u", Password: "p"},
		"docker.io":      {IdentityToken: "tok"},
	}})
	pf.Once(t.Context(), []pins.Pin{a, b, hub}, nil)
	if got := rt.auths[a.Ref()]; got == nil || got.Username != "u" || got.Password != "p" {
		t.Errorf("auth for %s = %+v", a, got)
	}
	if got := rt.auths[b.Ref()]; got != nil {
		t.Errorf("auth for %s = %+v, want none", b, got)
	}
	if got := rt.auths[hub.Ref()]; got == nil || got.IdentityToken != "tok" {
		t.Errorf("auth for %s = %+v", hub, got)
	}
}

// TestPullErrorIsFailed: a pull error is a failed outcome with its reason.
func TestPullErrorIsFailed(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		rt := newFakeRuntime()
		rt.pullErr = errors.New("boom")
		pf := prefetch.New(&fakeJudge{answer: answer(verdict.Verified, "")}, rt, nil, prefetch.Options{OnceAttempts: 2})
		out := pf.Once(t.Context(), []pins.Pin{pin(t, "r.example/x", 1)}, nil)
		if out[0].Result != prefetch.ResultFailed || out[0].Reason != prefetch.ReasonPullFailed || out[0].Attempts != 2 {
			t.Errorf("Once = %+v", out[0])
		}
	})
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}
