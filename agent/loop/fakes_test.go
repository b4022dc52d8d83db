package loop_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/loop"
	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func dg(n int) string { return fmt.Sprintf("sha256:%064x", n) }

// fakeInventory is a loop.Inventory over a map.
type fakeInventory struct {
	mu   sync.Mutex // guards imgs
	imgs map[string]inventory.Image
	// view, when set, is what View returns (benchmarks); else Snapshot.
	view []inventory.Image
}

func newInventory(imgs ...inventory.Image) *fakeInventory {
	f := &fakeInventory{imgs: map[string]inventory.Image{}}
	for _, img := range imgs {
		f.imgs[img.Digest] = img
	}
	return f
}

func (f *fakeInventory) Snapshot() []inventory.Image {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]inventory.Image, 0, len(f.imgs))
	for _, img := range f.imgs {
		out = append(out, img)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Digest < out[j].Digest })
	return out
}

func (f *fakeInventory) View() []inventory.Image {
	if f.view != nil {
		return f.view
	}
	return f.Snapshot()
}

func (f *fakeInventory) Digests() []string {
	var out []string
	for _, img := range f.Snapshot() {
		out = append(out, img.Digest)
	}
	return out
}

func (f *fakeInventory) Get(d string) (inventory.Image, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	img, ok := f.imgs[d]
	return img, ok
}

func (f *fakeInventory) Remove(d string) {
	f.mu.Lock()
	delete(f.imgs, d)
	f.mu.Unlock()
}

type call struct {
	repo, digest string
	at           time.Time
}

// fakeJudger returns scripted verdicts, records calls and can block.
type fakeJudger struct {
	mu    sync.Mutex // guards every field below
	fn    func(repo, digest string, n int) verdict.Result
	calls []call
	// block, when not nil, is waited on (or ctx) by every Judge call.
	block   chan struct{}
	entered chan struct{} // receives one value per call when not nil
}

func (f *fakeJudger) Judge(ctx context.Context, repo, digest string) verdict.Result {
	f.mu.Lock()
	n := 0
	for _, c := range f.calls {
		if c.digest == digest && c.repo == repo {
			n++
		}
	}
	f.calls = append(f.calls, call{repo, digest, time.Now()})
	block, entered, fn := f.block, f.entered, f.fn
	f.mu.Unlock()
	if entered != nil {
		entered <- struct{}{}
	}
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return verdict.Result{Digest: digest, Verdict: verdict.Pending, Reason: verdict.ReasonQueued}
		}
	}
	r := fn(repo, digest, n)
	r.Digest = digest
	return r
}

func (f *fakeJudger) Calls() []call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *fakeJudger) CallsFor(digest string) int {
	n := 0
	for _, c := range f.Calls() {
		if c.digest == digest {
			n++
		}
	}
	return n
}

// byRepo returns a fixed verdict per repository, verified for others.
func byRepo(m map[string]verdict.Verdict) func(string, string, int) verdict.Result {
	return func(repo, _ string, _ int) verdict.Result {
		v, ok := m[repo]
		if !ok {
			v = verdict.Verified
		}
		r := verdict.Result{Verdict: v, Policy: "p-" + repo, Fingerprint: "fp-" + repo}
		switch v {
		case verdict.Unverified:
			r.Reason = verdict.ReasonNoSignature
		case verdict.Untrusted:
			r.Reason = verdict.ReasonDenied
		case verdict.Pending:
			r.Reason = verdict.ReasonRegistryError
		}
		return r
	}
}

type fakePublisher struct {
	mu     sync.Mutex // guards every field below
	last   *nodestate.State
	n      int
	depths []int
}

func (p *fakePublisher) Publish(s *nodestate.State) {
	p.mu.Lock()
	p.last, p.n = s, p.n+1
	p.mu.Unlock()
}

func (p *fakePublisher) QueueDepth(n int) {
	p.mu.Lock()
	p.depths = append(p.depths, n)
	p.mu.Unlock()
}

func (p *fakePublisher) Last() *nodestate.State {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last
}

type fakeReporter struct {
	mu   sync.Mutex // guards last
	last *nodestate.State
}

func (r *fakeReporter) Report(st *nodestate.State) {
	r.mu.Lock()
	r.last = st
	r.mu.Unlock()
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// start runs l until the returned stop is called; stop waits for Run.
func start(t *testing.T, l *loop.Loop) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
}

// imageByDigest finds digest d in the loop's published state.
func imageByDigest(l *loop.Loop, d string) (nodestate.Image, bool) {
	imgs := l.State().Images
	i := slices.IndexFunc(imgs, func(im nodestate.Image) bool { return im.Digest == d })
	if i < 0 {
		return nodestate.Image{}, false
	}
	return imgs[i], true
}

// verdicts counts the images of a state by verdict.
func verdicts(st *nodestate.State) map[verdict.Verdict]int {
	out := map[verdict.Verdict]int{}
	for _, im := range st.Images {
		out[im.Result.Verdict]++
	}
	return out
}

func (p *fakePublisher) Count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

func (p *fakePublisher) LastDepth() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.depths) == 0 {
		return -1
	}
	return p.depths[len(p.depths)-1]
}

// cacheJudger answers verified at once, as a cache hit does.
type cacheJudger struct{ at time.Time }

func (c *cacheJudger) Judge(_ context.Context, _, digest string) verdict.Result {
	return verdict.Result{Digest: digest, Verdict: verdict.Verified, Policy: "p", Fingerprint: "fp",
		Signers: []string{"sha256:k"}, VerifiedAt: c.at, Source: verdict.SourceCache}
}
