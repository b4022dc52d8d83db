package loop_test

import (
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/loop"
	"github.com/pinwarden/pinwarden/agent/metrics"
	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/status"
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
	last   *metrics.State
	n      int
	depths []int
}

func (p *fakePublisher) Publish(s *metrics.State) {
	p.mu.Lock()
	p.last, p.n = s, p.n+1
	p.mu.Unlock()
}

func (p *fakePublisher) QueueDepth(n int) {
	p.mu.Lock()
	p.depths = append(p.depths, n)
	p.mu.Unlock()
}

func (p *fakePublisher) Last() *metrics.State {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last
}

type fakeReporter struct {
	mu   sync.Mutex // guards last
	last []status.Image
}

func (r *fakeReporter) Report(imgs []status.Image) {
	r.mu.Lock()
	r.last = imgs
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

func imageByDigest(imgs []status.Image, d string) (status.Image, bool) {
	i := slices.IndexFunc(imgs, func(s status.Image) bool { return s.Digest == d })
	if i < 0 {
		return status.Image{}, false
	}
	return imgs[i], true
}

func TestLoopJudgesEveryDigest(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		inv := newInventory(
			inventory.Image{Digest: dg(1), Tags: []string{"registry.example.com/a:v1"}},
			inventory.Image{Digest: dg(2), Repos: []string{"docker.io/library/nginx"}},
			inventory.Image{Digest: dg(3), Repos: []string{"registry.k8s.io/pause"}, Tags: []string{"registry.k8s.io/pause:3.10"}},
			inventory.Image{Digest: dg(4), ImageID: dg(40)}, // no name at all
		)
		j := &fakeJudger{fn: byRepo(map[string]verdict.Verdict{
			"docker.io/library/nginx": verdict.Untrusted,
			"registry.k8s.io/pause":   verdict.Ignored,
		})}
		pub := &fakePublisher{}
		rep := &fakeReporter{}
		l := loop.New(inv, j, pub, discard(), loop.Options{Workers: 2, Reporter: rep})
		stop := start(t, l)
		defer stop()
		l.Resync()
		synctest.Wait()

		want := map[string]verdict.Verdict{dg(1): verdict.Verified, dg(2): verdict.Untrusted, dg(3): verdict.Ignored, dg(4): verdict.Untrusted}
		imgs := l.Images()
		if len(imgs) != len(want) {
			t.Fatalf("Images() has %d entries, want %d: %+v", len(imgs), len(want), imgs)
		}
		for d, v := range want {
			img, ok := imageByDigest(imgs, d)
			if !ok || img.Verdict != v {
				t.Errorf("%s: %+v, want verdict %s", d, img, v)
			}
		}
		if img, _ := imageByDigest(imgs, dg(4)); img.Reason != verdict.ReasonNoPolicy || img.Image != dg(40) {
			t.Errorf("nameless image: reason %q image %q, want no-policy named by its ID", img.Reason, img.Image)
		}
		if n := j.CallsFor(dg(4)); n != 0 {
			t.Errorf("nameless image judged %d times, want 0", n)
		}
		for _, d := range []string{dg(1), dg(2), dg(3)} {
			if n := j.CallsFor(d); n != 1 {
				t.Errorf("%s judged %d times, want 1", d, n)
			}
		}
		st := pub.Last()
		if st == nil {
			t.Fatal("nothing published")
		}
		wantCounts := map[verdict.Verdict]int{verdict.Verified: 1, verdict.Untrusted: 2, verdict.Ignored: 1}
		for _, v := range verdict.All {
			if st.Images[v] != wantCounts[v] {
				t.Errorf("published Images[%s] = %d, want %d", v, st.Images[v], wantCounts[v])
			}
		}
		if len(st.Problems) != 2 {
			t.Errorf("problems %+v, want the two untrusted images", st.Problems)
		}
		rep.mu.Lock()
		if len(rep.last) != len(want) {
			t.Errorf("reporter got %d images, want %d", len(rep.last), len(want))
		}
		rep.mu.Unlock()

		// A digest that leaves the node leaves the status list.
		inv.Remove(dg(2))
		l.Resync()
		synctest.Wait()
		if _, ok := imageByDigest(l.Images(), dg(2)); ok || len(l.Images()) != 3 {
			t.Errorf("removed digest still listed: %+v", l.Images())
		}
	})
}

func TestLoopWorstOverRepos(t *testing.T) {
	t.Parallel()
	const a, b = "registry.example.com/a", "mirror.example.com/a"
	tests := []struct {
		name       string
		a, b       verdict.Verdict
		want       verdict.Verdict
		wantReason string
	}{
		{"verified and unverified", verdict.Verified, verdict.Unverified, verdict.Unverified, verdict.ReasonNoSignature},
		{"unverified and verified", verdict.Unverified, verdict.Verified, verdict.Unverified, verdict.ReasonNoSignature},
		{"ignored and untrusted", verdict.Ignored, verdict.Untrusted, verdict.Untrusted, verdict.ReasonDenied},
		{"ignored and verified", verdict.Ignored, verdict.Verified, verdict.Verified, ""},
		{"verified and pending", verdict.Verified, verdict.Pending, verdict.Pending, verdict.ReasonRegistryError},
		{"pending and unverified", verdict.Pending, verdict.Unverified, verdict.Unverified, verdict.ReasonNoSignature},
		{"untrusted and pending", verdict.Untrusted, verdict.Pending, verdict.Untrusted, verdict.ReasonDenied},
		{"both verified", verdict.Verified, verdict.Verified, verdict.Verified, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				// One repo through a repo digest, the other through a tag.
				inv := newInventory(inventory.Image{Digest: dg(1), Repos: []string{a}, Tags: []string{b + ":v1"}})
				j := &fakeJudger{fn: byRepo(map[string]verdict.Verdict{a: tt.a, b: tt.b})}
				l := loop.New(inv, j, nil, discard(), loop.Options{})
				stop := start(t, l)
				defer stop()
				l.Changed(dg(1))
				synctest.Wait()
				img, ok := imageByDigest(l.Images(), dg(1))
				if !ok || img.Verdict != tt.want || img.Reason != tt.wantReason {
					t.Errorf("got %s/%s, want %s/%s", img.Verdict, img.Reason, tt.want, tt.wantReason)
				}
				var repos []string
				for _, c := range j.Calls()[:2] {
					repos = append(repos, c.repo)
				}
				sort.Strings(repos)
				if !slices.Equal(repos, []string{b, a}) {
					t.Errorf("judged under %v, want both %s and %s", repos, a, b)
				}
			})
		})
	}
}

func TestLoopDriftAndRunning(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		const tag, other = "registry.example.com/shop/api:v2", "registry.example.com/shop/web:v1"
		running := []inventory.ContainerRef{
			{ID: "c1", PodNamespace: "shop", PodName: "api-1"},
			{ID: "c2", PodNamespace: "shop", PodName: "api-1"},
		}
		inv := newInventory(
			inventory.Image{Digest: dg(1), Repos: []string{"registry.example.com/shop/api"}, Tags: []string{tag}, Containers: running},
			inventory.Image{Digest: dg(2), Repos: []string{"registry.example.com/shop/web"}, Tags: []string{other}},
		)
		j := &fakeJudger{fn: byRepo(map[string]verdict.Verdict{"registry.example.com/shop/api": verdict.Unverified})}
		pub := &fakePublisher{}
		l := loop.New(inv, j, pub, discard(), loop.Options{})
		stop := start(t, l)
		defer stop()
		pinned := dg(99)
		l.SetPins([]pins.Pin{
			{Repo: "registry.example.com/shop/api", Tag: "v2", Digest: pinned},
			{Repo: "registry.example.com/shop/web", Tag: "v1", Digest: dg(2)}, // matches: no drift
			{Repo: "registry.example.com/shop/db", Digest: dg(3)},             // digest-only: never drift
		})
		l.Resync()
		synctest.Wait()

		st := pub.Last()
		if st == nil {
			t.Fatal("nothing published")
		}
		if st.Drifted != 1 {
			t.Errorf("Drifted = %d, want 1", st.Drifted)
		}
		wantProblems := []metrics.Problem{
			{Image: tag, Digest: dg(1), Problem: metrics.ProblemUnverified, Reason: verdict.ReasonNoSignature, Running: true},
			{Image: tag, Digest: dg(1), Problem: metrics.ProblemDrifted, Reason: loop.ReasonPinMismatch, Running: true},
		}
		if !slices.Equal(st.Problems, wantProblems) {
			t.Errorf("problems\n got %+v\nwant %+v", st.Problems, wantProblems)
		}
		// The drifted tag's series carries the digest the tag points at now.
		wantTags := []metrics.TagDigest{{Image: tag, Digest: dg(1)}, {Image: other, Digest: dg(2)}}
		if !slices.Equal(st.Tags, wantTags) {
			t.Errorf("tag series %+v, want %+v", st.Tags, wantTags)
		}
		if st.Running[verdict.Unverified] != 2 {
			t.Errorf("Running[unverified] = %d, want 2 containers", st.Running[verdict.Unverified])
		}
		img, _ := imageByDigest(l.Images(), dg(1))
		if !img.Drifted || img.PinnedDigest != pinned || img.RunningContainers != 2 || !slices.Equal(img.Pods, []string{"shop/api-1"}) {
			t.Errorf("status of the drifted image: %+v", img)
		}
		img, _ = imageByDigest(l.Images(), dg(2))
		if img.Drifted || img.PinnedDigest != dg(2) {
			t.Errorf("status of the pinned, matching image: %+v", img)
		}

		// New pins that match end the drift.
		l.SetPins([]pins.Pin{{Repo: "registry.example.com/shop/api", Tag: "v2", Digest: dg(1)}})
		synctest.Wait()
		if st := pub.Last(); st.Drifted != 0 || len(st.Problems) != 1 {
			t.Errorf("after repinning: drifted %d problems %+v", st.Drifted, st.Problems)
		}
	})
}

func TestBuildState(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	runningC := []inventory.ContainerRef{
		{ID: "c1", PodNamespace: "b", PodName: "p2"},
		{ID: "c2", PodNamespace: "a", PodName: "p1"},
		{ID: "c3", PodNamespace: "b", PodName: "p2"},
		{ID: "c4"}, // not in a pod
	}
	tests := []struct {
		name        string
		img         inventory.Image
		result      *verdict.Result
		pinned      map[string]string
		wantImage   status.Image
		wantProblem []metrics.Problem
		wantTags    []metrics.TagDigest
		wantDrifted int
	}{
		{
			name:      "verified, idle, unpinned: no series",
			img:       inventory.Image{Digest: dg(1), ImageID: dg(11), Tags: []string{"r.io/a:v1"}},
			result:    &verdict.Result{Verdict: verdict.Verified, Signers: []string{"k"}, VerifiedAt: at, Source: verdict.SourceCache, Policy: "p"},
			wantImage: status.Image{Image: "r.io/a:v1", Tags: []string{"r.io/a:v1"}, Digest: dg(1), ImageID: dg(11), Verdict: verdict.Verified, Pods: []string{}, Signers: []string{"k"}, VerifiedAt: &at, Source: verdict.SourceCache, Policy: "p"},
		},
		{
			name:        "not judged yet: pending/queued problem",
			img:         inventory.Image{Digest: dg(2), Repos: []string{"r.io/b"}},
			wantImage:   status.Image{Image: "r.io/b", Tags: []string{}, Digest: dg(2), Verdict: verdict.Pending, Reason: verdict.ReasonQueued, Pods: []string{}, Signers: []string{}},
			wantProblem: []metrics.Problem{{Image: "r.io/b", Digest: dg(2), Problem: metrics.ProblemPending, Reason: verdict.ReasonQueued}},
		},
		{
			name:        "untrusted running: running problem and tag series",
			img:         inventory.Image{Digest: dg(3), Tags: []string{"r.io/c:v1", "r.io/c:latest"}, Containers: runningC},
			result:      &verdict.Result{Verdict: verdict.Untrusted, Reason: verdict.ReasonNoPolicy, VerifiedAt: at},
			wantImage:   status.Image{Image: "r.io/c:v1", Tags: []string{"r.io/c:v1", "r.io/c:latest"}, Digest: dg(3), Verdict: verdict.Untrusted, Reason: verdict.ReasonNoPolicy, RunningContainers: 4, Pods: []string{"a/p1", "b/p2"}, Signers: []string{}, VerifiedAt: &at},
			wantProblem: []metrics.Problem{{Image: "r.io/c:v1", Digest: dg(3), Problem: metrics.ProblemUntrusted, Reason: verdict.ReasonNoPolicy, Running: true}},
			wantTags:    []metrics.TagDigest{{Image: "r.io/c:v1", Digest: dg(3)}, {Image: "r.io/c:latest", Digest: dg(3)}},
		},
		{
			name:        "pinned tag elsewhere: drifted",
			img:         inventory.Image{Digest: dg(4), Tags: []string{"r.io/d:v1", "r.io/d:v2"}},
			result:      &verdict.Result{Verdict: verdict.Verified, VerifiedAt: at},
			pinned:      map[string]string{"r.io/d:v2": dg(44)},
			wantImage:   status.Image{Image: "r.io/d:v1", Tags: []string{"r.io/d:v1", "r.io/d:v2"}, Digest: dg(4), Verdict: verdict.Verified, Drifted: true, PinnedDigest: dg(44), Pods: []string{}, Signers: []string{}, VerifiedAt: &at},
			wantProblem: []metrics.Problem{{Image: "r.io/d:v2", Digest: dg(4), Problem: metrics.ProblemDrifted, Reason: loop.ReasonPinMismatch}},
			wantTags:    []metrics.TagDigest{{Image: "r.io/d:v2", Digest: dg(4)}},
			wantDrifted: 1,
		},
		{
			name:      "pinned tag here: series, no drift",
			img:       inventory.Image{Digest: dg(5), Tags: []string{"r.io/e:v1"}},
			result:    &verdict.Result{Verdict: verdict.Ignored},
			pinned:    map[string]string{"r.io/e:v1": dg(5), "r.io/other:v1": dg(6)},
			wantImage: status.Image{Image: "r.io/e:v1", Tags: []string{"r.io/e:v1"}, Digest: dg(5), Verdict: verdict.Ignored, PinnedDigest: dg(5), Pods: []string{}, Signers: []string{}},
			wantTags:  []metrics.TagDigest{{Image: "r.io/e:v1", Digest: dg(5)}},
		},
		{
			name:        "unverified, name from the image ID",
			img:         inventory.Image{Digest: dg(7), ImageID: dg(77)},
			result:      &verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonThresholdNotMet},
			wantImage:   status.Image{Image: dg(77), Tags: []string{}, Digest: dg(7), ImageID: dg(77), Verdict: verdict.Unverified, Reason: verdict.ReasonThresholdNotMet, Pods: []string{}, Signers: []string{}},
			wantProblem: []metrics.Problem{{Image: dg(77), Digest: dg(7), Problem: metrics.ProblemUnverified, Reason: verdict.ReasonThresholdNotMet}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			results := map[string]verdict.Result{}
			if tt.result != nil {
				results[tt.img.Digest] = *tt.result
			}
			st, imgs := loop.BuildState([]inventory.Image{tt.img}, results, tt.pinned)
			if len(imgs) != 1 {
				t.Fatalf("got %d images", len(imgs))
			}
			got := imgs[0]
			if !reflect.DeepEqual(stripTime(got), stripTime(tt.wantImage)) {
				t.Errorf("image\n got %+v\nwant %+v", stripTime(got), stripTime(tt.wantImage))
			}
			if (got.VerifiedAt == nil) != (tt.wantImage.VerifiedAt == nil) ||
				(got.VerifiedAt != nil && !got.VerifiedAt.Equal(*tt.wantImage.VerifiedAt)) {
				t.Errorf("VerifiedAt %v, want %v", got.VerifiedAt, tt.wantImage.VerifiedAt)
			}
			if !slices.Equal(st.Problems, tt.wantProblem) {
				t.Errorf("problems\n got %+v\nwant %+v", st.Problems, tt.wantProblem)
			}
			if !slices.Equal(st.Tags, tt.wantTags) {
				t.Errorf("tags %+v, want %+v", st.Tags, tt.wantTags)
			}
			if st.Drifted != tt.wantDrifted {
				t.Errorf("drifted %d, want %d", st.Drifted, tt.wantDrifted)
			}
			if st.Images[got.Verdict] != 1 || len(st.Images) != 1 {
				t.Errorf("Images %v, want 1 %s", st.Images, got.Verdict)
			}
			if st.Running[got.Verdict] != len(tt.img.Containers) {
				t.Errorf("Running %v, want %d %s", st.Running, len(tt.img.Containers), got.Verdict)
			}
		})
	}
}

func stripTime(s status.Image) status.Image { s.VerifiedAt = nil; return s }

func TestBuildStateOnlyNodeImages(t *testing.T) {
	t.Parallel()
	// Results of digests no longer on the node are not counted.
	snap := []inventory.Image{{Digest: dg(1), Repos: []string{"r.io/a"}}}
	results := map[string]verdict.Result{
		dg(1): {Verdict: verdict.Verified},
		dg(2): {Verdict: verdict.Untrusted, Reason: verdict.ReasonDenied},
	}
	st, imgs := loop.BuildState(snap, results, nil)
	if len(imgs) != 1 || st.Images[verdict.Verified] != 1 || st.Images[verdict.Untrusted] != 0 || len(st.Problems) != 0 {
		t.Errorf("state %+v images %+v", st, imgs)
	}
}

func TestSeverity(t *testing.T) {
	t.Parallel()
	order := []verdict.Verdict{verdict.Ignored, verdict.Verified, verdict.Pending, verdict.Unverified, verdict.Untrusted}
	for i := 1; i < len(order); i++ {
		if loop.Severity(order[i-1]) >= loop.Severity(order[i]) {
			t.Errorf("Severity(%s)=%d not below Severity(%s)=%d",
				order[i-1], loop.Severity(order[i-1]), order[i], loop.Severity(order[i]))
		}
	}
	// An unknown verdict is never better than verified.
	if loop.Severity("") <= loop.Severity(verdict.Verified) {
		t.Errorf("unknown verdict ranks as good as verified")
	}
}

func TestBackoff(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		base, max time.Duration
		attempt   int
		want      time.Duration // before jitter
	}{
		{"first", 2 * time.Second, 5 * time.Minute, 0, 2 * time.Second},
		{"second", 2 * time.Second, 5 * time.Minute, 1, 4 * time.Second},
		{"fifth", 2 * time.Second, 5 * time.Minute, 4, 32 * time.Second},
		{"capped", 2 * time.Second, 5 * time.Minute, 8, 5 * time.Minute},
		{"huge attempt capped", 2 * time.Second, 5 * time.Minute, 1 << 20, 5 * time.Minute},
		{"base above max", 10 * time.Minute, 5 * time.Minute, 0, 5 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			lo, hi := tt.want-tt.want/10, tt.want+tt.want/10
			seen := map[time.Duration]bool{}
			for range 500 {
				got := loop.Backoff(tt.base, tt.max, tt.attempt)
				if got < lo || got > hi {
					t.Fatalf("Backoff(%v, %v, %d) = %v, want within [%v, %v]", tt.base, tt.max, tt.attempt, got, lo, hi)
				}
				seen[got] = true
			}
			// Jitter spreads retries (only meaningful for non-tiny durations).
			if tt.want >= time.Second && len(seen) < 10 {
				t.Errorf("only %d distinct values in 500 draws: no jitter", len(seen))
			}
		})
	}
}

func TestRepos(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		img  inventory.Image
		want []string
	}{
		{"none", inventory.Image{Digest: dg(1)}, []string{}},
		{"repo digests and tags deduplicated and sorted", inventory.Image{
			Repos: []string{"r.io/b", "r.io/a"},
			Tags:  []string{"r.io/a:v1", "r.io/a:v2", "localhost:5000/c:v1"},
		}, []string{"localhost:5000/c", "r.io/a", "r.io/b"}},
		{"tag only", inventory.Image{Tags: []string{"docker.io/library/nginx:1.27"}}, []string{"docker.io/library/nginx"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := loop.Repos(tt.img); !slices.Equal(got, tt.want) {
				t.Errorf("Repos = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestRepoOfTag(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{"r.io/a:v1", "r.io/a"},
		{"localhost:5000/a:v1", "localhost:5000/a"},
		{"localhost:5000/a", "localhost:5000/a"},
		{"nginx:latest", "nginx"},
		{"nginx", "nginx"},
		{"r.io/a/b/c:1.2.3-rc.1", "r.io/a/b/c"},
	}
	for _, tt := range tests {
		if got := loop.RepoOfTag(tt.in); got != tt.want {
			t.Errorf("RepoOfTag(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestLoopRetriesPendingWithBackoff(t *testing.T) {
	t.Parallel()
	const base, max = 2 * time.Second, 10 * time.Second
	tests := []struct {
		name     string
		pendings int // pending verdicts before the definitive one
		final    verdict.Verdict
	}{
		{"verified after one failure", 1, verdict.Verified},
		{"unverified after five failures (capped backoff)", 5, verdict.Unverified},
		{"verified at once", 0, verdict.Verified},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				inv := newInventory(inventory.Image{Digest: dg(1), Repos: []string{"r.io/a"}})
				j := &fakeJudger{fn: func(_, _ string, n int) verdict.Result {
					if n < tt.pendings {
						return verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryUnreachable}
					}
					return verdict.Result{Verdict: tt.final, Fingerprint: "fp"}
				}}
				l := loop.New(inv, j, nil, discard(), loop.Options{RetryBase: base, RetryMax: max})
				stop := start(t, l)
				defer stop()
				l.Changed(dg(1))
				synctest.Wait()
				if img, _ := imageByDigest(l.Images(), dg(1)); tt.pendings > 0 &&
					(img.Verdict != verdict.Pending || img.Reason != verdict.ReasonRegistryUnreachable) {
					t.Errorf("after the first failure: %s/%s, want pending/registry-unreachable", img.Verdict, img.Reason)
				}
				// Long enough for every retry, and then some.
				time.Sleep(time.Duration(tt.pendings+1) * max * 2)
				synctest.Wait()

				calls := j.Calls()
				if len(calls) != tt.pendings+1 {
					t.Fatalf("judged %d times, want %d (no retries once definitive)", len(calls), tt.pendings+1)
				}
				for i := 1; i < len(calls); i++ {
					want := min(base<<(i-1), max)
					gap := calls[i].at.Sub(calls[i-1].at)
					if gap < want-want/10 || gap > want+want/10 {
						t.Errorf("retry %d after %v, want %v ±10%%", i, gap, want)
					}
				}
				if img, _ := imageByDigest(l.Images(), dg(1)); img.Verdict != tt.final {
					t.Errorf("final verdict %s, want %s", img.Verdict, tt.final)
				}
			})
		})
	}
}

func TestLoopCoalescesChanges(t *testing.T) {
	t.Parallel()
	t.Run("before the workers start", func(t *testing.T) {
		t.Parallel()
		synctest.Test(t, func(t *testing.T) {
			inv := newInventory(inventory.Image{Digest: dg(1), Repos: []string{"r.io/a"}})
			j := &fakeJudger{fn: byRepo(nil)}
			var dropped atomic.Int64
			l := loop.New(inv, j, nil, discard(), loop.Options{QueueCapacity: 2, OnDropped: func() { dropped.Add(1) }})
			for range 1000 {
				l.Changed(dg(1))
			}
			stop := start(t, l)
			defer stop()
			synctest.Wait()
			if n := j.CallsFor(dg(1)); n != 1 {
				t.Errorf("judged %d times, want 1", n)
			}
			if n := dropped.Load(); n != 0 {
				t.Errorf("%d drops for one coalesced digest", n)
			}
		})
	})
	t.Run("while being judged", func(t *testing.T) {
		t.Parallel()
		synctest.Test(t, func(t *testing.T) {
			inv := newInventory(inventory.Image{Digest: dg(1), Repos: []string{"r.io/a"}})
			block := make(chan struct{})
			j := &fakeJudger{fn: byRepo(nil), block: block}
			l := loop.New(inv, j, nil, discard(), loop.Options{Workers: 4})
			stop := start(t, l)
			defer stop()
			l.Changed(dg(1))
			synctest.Wait() // one worker blocked in Judge
			for range 1000 {
				l.Changed(dg(1))
			}
			synctest.Wait()
			if n := j.CallsFor(dg(1)); n != 1 {
				t.Errorf("judged %d times while the first judgement runs, want 1 (no parallel judgement of a digest)", n)
			}
			close(block)
			synctest.Wait()
			if n := j.CallsFor(dg(1)); n != 2 {
				t.Errorf("judged %d times in all, want 2 (one more for the changes meanwhile)", n)
			}
		})
	})
}

func TestLoopRejudge(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		current map[string]bool
		want    []string // digests judged again
	}{
		{"one fingerprint gone", map[string]bool{"fp-r.io/a": true, "fp-r.io/c": true}, []string{dg(2), dg(4)}},
		{"all fingerprints current", map[string]bool{"fp-r.io/a": true, "fp-r.io/b": true, "fp-r.io/c": true}, []string{dg(4)}},
		{"nil: everything", nil, []string{dg(1), dg(2), dg(3), dg(4)}},
		{"empty: everything", map[string]bool{}, []string{dg(1), dg(2), dg(3), dg(4)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				inv := newInventory(
					inventory.Image{Digest: dg(1), Repos: []string{"r.io/a"}},
					inventory.Image{Digest: dg(2), Repos: []string{"r.io/b"}},
					inventory.Image{Digest: dg(3), Repos: []string{"r.io/c"}},
					inventory.Image{Digest: dg(4), Repos: []string{"r.io/none"}}, // no-policy: no fingerprint
				)
				j := &fakeJudger{fn: func(repo, _ string, _ int) verdict.Result {
					if repo == "r.io/none" {
						return verdict.Result{Verdict: verdict.Untrusted, Reason: verdict.ReasonNoPolicy}
					}
					return verdict.Result{Verdict: verdict.Verified, Fingerprint: "fp-" + repo}
				}}
				l := loop.New(inv, j, nil, discard(), loop.Options{})
				stop := start(t, l)
				defer stop()
				l.Resync()
				synctest.Wait()
				before := len(j.Calls())
				if before != 4 {
					t.Fatalf("initial judgements %d, want 4", before)
				}
				l.Rejudge(tt.current)
				synctest.Wait()
				var again []string
				for _, c := range j.Calls()[before:] {
					again = append(again, c.digest)
				}
				sort.Strings(again)
				if !slices.Equal(again, tt.want) {
					t.Errorf("judged again %v, want %v", again, tt.want)
				}
			})
		})
	}
}

func TestLoopQueueOverflow(t *testing.T) {
	t.Parallel()
	var dropped atomic.Int64
	var imgs []inventory.Image
	for i := range 5 {
		imgs = append(imgs, inventory.Image{Digest: dg(i), Repos: []string{"r.io/a"}})
	}
	inv := newInventory(imgs...)
	j := &fakeJudger{fn: byRepo(nil)}
	l := loop.New(inv, j, nil, discard(), loop.Options{QueueCapacity: 2, OnDropped: func() { dropped.Add(1) }})
	// Not running: nothing drains the queue.
	l.Changed(dg(0), dg(1), dg(2))
	if n := dropped.Load(); n != 1 {
		t.Errorf("dropped %d after 3 digests into capacity 2, want 1", n)
	}
	l.Changed(dg(0)) // already waiting: merged, not dropped
	if n := dropped.Load(); n != 1 {
		t.Errorf("dropped %d after re-adding a waiting digest, want 1", n)
	}
	l.Resync() // 5 digests, 2 already waiting
	if n := dropped.Load(); n != 4 {
		t.Errorf("dropped %d after a resync of 5 into a full queue, want 4", n)
	}
}

func TestLoopRunStopsOnCancel(t *testing.T) {
	t.Parallel()
	inv := newInventory(inventory.Image{Digest: dg(1), Repos: []string{"r.io/a"}})
	j := &fakeJudger{fn: byRepo(nil), block: make(chan struct{}), entered: make(chan struct{}, 1)}
	pub := &fakePublisher{}
	l := loop.New(inv, j, pub, discard(), loop.Options{Workers: 3})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	l.Changed(dg(1))
	select {
	case <-j.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the digest was never judged")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run = %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	// The judgement cut short by the cancel is not taken as the verdict.
	if img, ok := imageByDigest(l.Images(), dg(1)); ok && img.Reason != verdict.ReasonQueued {
		t.Errorf("abandoned judgement published: %+v", img)
	}
	// After shutdown, Changed neither blocks nor starts work.
	l.Changed(dg(1))
	if n := j.CallsFor(dg(1)); n != 1 {
		t.Errorf("judged %d times, want 1", n)
	}
}

// A definitive verdict is re-judged when its cache entry expires, not only
// at the next relist.
func TestLoopRejudgesAtExpiry(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		v          verdict.Verdict
		verifiedAt time.Duration // how old the first verdict already is
		calls      [2]int        // judged by 59m55s and by 1h00m05s
	}{
		{"verified, expires after verifiedTTL", verdict.Verified, 0, [2]int{1, 2}},
		{"unverified, expires after failedTTL", verdict.Unverified, 0, [2]int{6, 6}}, // 0, 10m01s, ..., 50m05s
		{"verified 50m ago: expires after 10m", verdict.Verified, 50 * time.Minute, [2]int{2, 2}},
		{"untrusted never expires", verdict.Untrusted, 0, [2]int{1, 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				inv := newInventory(inventory.Image{Digest: dg(1), Repos: []string{"r.io/a"}})
				j := &fakeJudger{fn: func(_, _ string, n int) verdict.Result {
					at := time.Now()
					if n == 0 {
						at = at.Add(-tt.verifiedAt)
					}
					return verdict.Result{Verdict: tt.v, Fingerprint: "fp", VerifiedAt: at}
				}}
				l := loop.New(inv, j, nil, discard(), loop.Options{VerifiedTTL: time.Hour, FailedTTL: 10 * time.Minute})
				stop := start(t, l)
				defer stop()
				l.Changed(dg(1))
				time.Sleep(time.Hour - 5*time.Second)
				synctest.Wait()
				if n := j.CallsFor(dg(1)); n != tt.calls[0] {
					t.Fatalf("judged %d times by 59m55s, want %d", n, tt.calls[0])
				}
				time.Sleep(10 * time.Second)
				synctest.Wait()
				if n := j.CallsFor(dg(1)); n != tt.calls[1] {
					t.Fatalf("judged %d times by 1h00m05s, want %d", n, tt.calls[1])
				}
			})
		})
	}
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

// TestLoopPublishCoalescing: while digests wait in the queue the state is
// rebuilt at most once per PublishInterval (a relist of 10k cache hits must
// not rebuild the state 10k times), the state is published at once when the
// queue drains (a single change is never delayed), and a judgement that
// changes nothing does not rebuild the state.
func TestLoopPublishCoalescing(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		const n, interval = 5, time.Second
		var imgs []inventory.Image
		var ds []string
		for i := range n {
			imgs = append(imgs, inventory.Image{Digest: dg(i), Repos: []string{fmt.Sprint("r.io/a", i)}})
			ds = append(ds, dg(i))
		}
		inv := newInventory(imgs...)
		block := make(chan struct{})
		j := &fakeJudger{fn: byRepo(nil), block: block}
		pub := &fakePublisher{}
		l := loop.New(inv, j, pub, discard(), loop.Options{Workers: 1, PublishInterval: interval})
		stop := start(t, l)
		defer stop()

		l.Changed(ds...)
		synctest.Wait() // the worker waits in the first Judge
		if got := pub.Count(); got != 1 {
			t.Fatalf("%d publishes after the first change, want 1 (at once)", got)
		}
		for range 3 {
			block <- struct{}{}
			synctest.Wait()
		}
		if got := pub.Count(); got != 1 {
			t.Errorf("%d publishes after 3 verdicts with digests still waiting, want 1 (coalesced)", got)
		}
		time.Sleep(interval)
		synctest.Wait()
		if got := pub.Count(); got != 2 {
			t.Errorf("%d publishes after PublishInterval with digests waiting, want 2", got)
		}
		if v := pub.Last().Images[verdict.Verified]; v != 3 {
			t.Errorf("the interval publish shows %d verified, want 3", v)
		}
		before := time.Now()
		close(block)
		synctest.Wait()
		if !time.Now().Equal(before) {
			t.Errorf("the drained queue was published after %s, want at once", time.Since(before))
		}
		if v := pub.Last().Images[verdict.Verified]; v != n {
			t.Errorf("the last publish shows %d verified, want %d", v, n)
		}
		if img, _ := imageByDigest(l.Images(), dg(n-1)); img.Verdict != verdict.Verified {
			t.Errorf("status shows %s for the last digest, want verified", img.Verdict)
		}
		if d := pub.LastDepth(); d != 0 {
			t.Errorf("queue depth %d after draining, want 0", d)
		}

		// The same verdicts again: one publish for the change itself, none
		// for the judgements that change nothing.
		time.Sleep(interval)
		n0 := pub.Count()
		l.Changed(ds...)
		synctest.Wait()
		if got := pub.Count() - n0; got != 1 {
			t.Errorf("%d publishes for a re-judgement with unchanged verdicts, want 1", got)
		}
		if c := j.CallsFor(dg(0)); c != 2 {
			t.Errorf("digest judged %d times, want 2", c)
		}
	})
}

// TestLoopReleasesMemoryAfterBacklog: the memory of a large burst (a full
// relist) is handed back once the burst is judged and published, and not
// for ordinary changes.
func TestLoopReleasesMemoryAfterBacklog(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		var imgs []inventory.Image
		var ds []string
		for i := range 5 {
			imgs = append(imgs, inventory.Image{Digest: dg(i), Repos: []string{fmt.Sprint("r.io/a", i)}})
			ds = append(ds, dg(i))
		}
		block := make(chan struct{})
		j := &fakeJudger{fn: byRepo(nil), block: block}
		pub := &fakePublisher{}
		var released atomic.Int32
		opts := loop.Options{Workers: 1, ReleaseAfter: 3}
		loop.SetRelease(&opts, func() { released.Add(1) })
		l := loop.New(newInventory(imgs...), j, pub, discard(), opts)
		stop := start(t, l)
		defer stop()
		l.Changed(ds...)
		synctest.Wait() // the worker waits in the first Judge
		if n := released.Load(); n != 0 {
			t.Fatalf("released %d times before the backlog was judged", n)
		}
		close(block)
		synctest.Wait()
		if n := released.Load(); n != 1 {
			t.Fatalf("released %d times after a backlog of 5, want 1", n)
		}
		l.Changed(ds[:2]...)
		synctest.Wait()
		time.Sleep(time.Minute)
		synctest.Wait()
		if n := released.Load(); n != 1 {
			t.Fatalf("released %d times in all after a change of 2 digests, want 1 (only after backlogs of 3)", n)
		}
	})
}

// BenchmarkLoopRelist10k is the loop's share of a warm restart on a node of
// 10,000 images: every digest queued at once (Resync), judged from the
// cache, until the published state shows all of them verified. It guards
// publish coalescing: publishing on every wake-up ("no-interval", the
// behaviour before PublishInterval) rebuilds the state of 10,000 images
// back to back while the queue drains, competing with the judging.
func BenchmarkLoopRelist10k(b *testing.B) {
	const n = 10000
	imgs := make([]inventory.Image, n)
	for i := range n {
		repo := fmt.Sprintf("registry.example.com/team%d/app%d", i%50, i)
		imgs[i] = inventory.Image{Digest: dg(i), Repos: []string{repo}, Tags: []string{repo + ":v1"}}
	}
	inv := newInventory(imgs...)
	inv.view = inv.Snapshot() // a real inventory's View is built once per change
	at := time.Now()
	j := &cacheJudger{at: at}
	for _, bc := range []struct {
		name     string
		interval time.Duration
	}{{"no-interval", time.Nanosecond}, {"coalesced", 0}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			publishes := 0
			for b.Loop() {
				pub := &fakePublisher{}
				l := loop.New(inv, j, pub, discard(), loop.Options{PublishInterval: bc.interval, ReleaseAfter: -1})
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				go func() { done <- l.Run(ctx) }()
				l.Resync()
				for {
					if s := pub.Last(); s != nil && s.Images[verdict.Verified] == n {
						break
					}
					time.Sleep(100 * time.Microsecond)
				}
				cancel()
				<-done
				publishes += pub.Count()
			}
			b.ReportMetric(float64(publishes)/float64(b.N), "publishes/op")
		})
	}
}

// cacheJudger answers verified at once, as a cache hit does.
type cacheJudger struct{ at time.Time }

func (c *cacheJudger) Judge(_ context.Context, _, digest string) verdict.Result {
	return verdict.Result{Digest: digest, Verdict: verdict.Verified, Policy: "p", Fingerprint: "fp",
		Signers: []string{"sha256:k"}, VerifiedAt: c.at, Source: verdict.SourceCache}
}
