package inventory_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/inventory/inventorytest"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// recorder is an Observer that keeps what it saw.
type recorder struct {
	mu       sync.Mutex
	ups      []bool
	topics   map[string]int
	resynced int
	repaired int
}

func (r *recorder) RelistRepaired(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.repaired += n
}

func newRecorder() *recorder { return &recorder{topics: map[string]int{}} }

func (r *recorder) RuntimeUp(up bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ups = append(r.ups, up)
}

func (r *recorder) RuntimeEvent(topic string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.topics[topic]++
}

func (r *recorder) Resynced(time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.resynced++
}

func (r *recorder) upHistory() []bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.ups)
}

func (r *recorder) resyncs() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.resynced
}

// start runs inv until the test ends and checks that Run returns nil.
func start(t testing.TB, inv *inventory.Inventory) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v after cancel, want nil", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
}

// eventually waits (harness.Eventually) until cond holds or timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	harness.Eventually(t, timeout, what, func() (bool, string) { return cond(), "" })
}

const repo = "registry.test:5000/shop/api"

func d(s string) string { return inventorytest.Digest(s) }

func TestInitialListAndModel(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	f.Pull(repo+":v1", d("m1"), d("c1"), 100)
	f.Pull(repo+":v2", d("m2"), d("c2"), 200)
	f.Pull("registry.test:5000/other@"+d("m3"), d("m3"), d("c3"), 300)

	inv := inventory.New(f, nil)
	if inv.Ready() {
		t.Fatal("Ready before Run")
	}
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)

	want := []inventory.Image{
		{Digest: d("m1"), ImageID: d("c1"), Repos: []string{repo}, Tags: []string{repo + ":v1"}},
		{Digest: d("m2"), ImageID: d("c2"), Repos: []string{repo}, Tags: []string{repo + ":v2"}},
		{Digest: d("m3"), ImageID: d("c3"), Repos: []string{"registry.test:5000/other"}},
	}
	slices.SortFunc(want, func(a, b inventory.Image) int { return cmpStr(a.Digest, b.Digest) })
	got := inv.Snapshot()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("Snapshot =\n%+v\nwant\n%+v", got, want)
	}
	var wantDigests []string
	for _, img := range want {
		wantDigests = append(wantDigests, img.Digest)
	}
	if ds := inv.Digests(); !slices.Equal(ds, wantDigests) {
		t.Errorf("Digests = %v, want %v", ds, wantDigests)
	}
	if !inv.RuntimeUp() {
		t.Error("RuntimeUp false after a successful list")
	}
	if dg, ok := inv.DigestForTag(repo + ":v2"); !ok || dg != d("m2") {
		t.Errorf("DigestForTag(v2) = %s, %v", dg, ok)
	}
	if _, ok := inv.DigestForTag(repo + ":v3"); ok {
		t.Error("DigestForTag of an absent tag reported ok")
	}
	if im, ok := inv.Get(d("m1")); !ok || im.ImageID != d("c1") {
		t.Errorf("Get(m1) = %+v, %v", im, ok)
	}
	// The snapshot is a copy.
	got[0].Tags = append(got[0].Tags, "mutated")
	if again := inv.Snapshot(); slices.Contains(again[0].Tags, "mutated") {
		t.Error("Snapshot shares slices with the inventory")
	}
}

func cmpStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func TestDockerHubShortNames(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	f.Pull("docker.io/library/nginx:1.27", d("n"), d("nc"), 1)
	inv := inventory.New(f, nil)
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)
	for _, in := range []string{"nginx:1.27", "docker.io/nginx:1.27", "docker.io/library/nginx:1.27"} {
		if dg, ok := inv.DigestForTag(in); !ok || dg != d("n") {
			t.Errorf("DigestForTag(%q) = %q, %v", in, dg, ok)
		}
	}
}

// TestEvents covers every change the event stream must keep current.
func TestEvents(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		before func(f *inventorytest.Fake)
		act    func(f *inventorytest.Fake)
		check  func(t *testing.T, inv *inventory.Inventory)
		notify []string // digests the change must name
	}{
		{
			name: "pull appears",
			act:  func(f *inventorytest.Fake) { f.Pull(repo+":v1", d("m1"), d("c1"), 1) },
			check: func(t *testing.T, inv *inventory.Inventory) {
				if dg, ok := inv.DigestForTag(repo + ":v1"); !ok || dg != d("m1") {
					t.Errorf("tag -> %q, %v", dg, ok)
				}
			},
			notify: []string{d("m1")},
		},
		{
			name:   "tag moves to a new digest",
			before: func(f *inventorytest.Fake) { f.Pull(repo+":v1", d("m1"), d("c1"), 1) },
			act:    func(f *inventorytest.Fake) { f.Pull(repo+":v1", d("m2"), d("c2"), 1) },
			check: func(t *testing.T, inv *inventory.Inventory) {
				if dg, _ := inv.DigestForTag(repo + ":v1"); dg != d("m2") {
					t.Errorf("tag -> %q, want m2", dg)
				}
				old, ok := inv.Get(d("m1"))
				if !ok || len(old.Tags) != 0 {
					t.Errorf("old digest = %+v, %v; want present without tags", old, ok)
				}
			},
			notify: []string{d("m1"), d("m2")},
		},
		{
			name:   "untag keeps the digest",
			before: func(f *inventorytest.Fake) { f.Pull(repo+":v1", d("m1"), d("c1"), 1) },
			act:    func(f *inventorytest.Fake) { f.Untag(repo + ":v1") },
			check: func(t *testing.T, inv *inventory.Inventory) {
				if _, ok := inv.DigestForTag(repo + ":v1"); ok {
					t.Error("deleted tag still resolves")
				}
				if im, ok := inv.Get(d("m1")); !ok || len(im.Tags) != 0 {
					t.Errorf("digest = %+v, %v", im, ok)
				}
			},
			notify: []string{d("m1")},
		},
		{
			name:   "remove deletes the digest",
			before: func(f *inventorytest.Fake) { f.Pull(repo+":v1", d("m1"), d("c1"), 1) },
			act:    func(f *inventorytest.Fake) { f.Remove(d("c1")) },
			check: func(t *testing.T, inv *inventory.Inventory) {
				if _, ok := inv.Get(d("m1")); ok {
					t.Error("removed digest still present")
				}
			},
			notify: []string{d("m1")},
		},
		{
			name:   "one image ID under two digests",
			before: func(f *inventorytest.Fake) { f.Pull(repo+":v1", d("m1"), d("c1"), 1) },
			act:    func(f *inventorytest.Fake) { f.Pull("registry.test:5000/mirror/api:v1", d("m1b"), d("c1"), 1) },
			check: func(t *testing.T, inv *inventory.Inventory) {
				a, _ := inv.Get(d("m1"))
				b, _ := inv.Get(d("m1b"))
				if !slices.Equal(a.Tags, []string{repo + ":v1"}) || !slices.Equal(b.Tags, []string{"registry.test:5000/mirror/api:v1"}) {
					t.Errorf("tags by digest: m1 %v, m1b %v", a.Tags, b.Tags)
				}
				if a.ImageID != d("c1") || b.ImageID != d("c1") {
					t.Errorf("image IDs %s %s", a.ImageID, b.ImageID)
				}
			},
			notify: []string{d("m1b")},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := inventorytest.NewFake()
			if tt.before != nil {
				tt.before(f)
			}
			rec := newRecorder()
			inv := inventory.New(f, nil, inventory.WithObserver(rec))
			sub := inv.Subscribe()
			defer inv.Unsubscribe(sub)
			start(t, inv)
			eventually(t, 5*time.Second, "ready", inv.Ready)
			if ch := <-sub; !ch.Resync {
				t.Errorf("first change %+v is not the initial resync", ch)
			}
			tt.act(f)
			seen := map[string]bool{}
			eventually(t, 5*time.Second, fmt.Sprintf("notification of %v", tt.notify), func() bool {
				select {
				case ch := <-sub:
					for _, dg := range ch.Digests {
						seen[dg] = true
					}
				default:
				}
				for _, dg := range tt.notify {
					if !seen[dg] {
						return false
					}
				}
				return true
			})
			tt.check(t, inv)
			if rec.resyncs() != 1 {
				t.Errorf("%d resyncs, want 1: events alone must keep the inventory current", rec.resyncs())
			}
		})
	}
}

// An image without a repo digest (imported, or caught in the middle of its
// pull) is keyed on the manifest its containerd records target, never on
// its image ID: a config digest would be verified, and fail, as a phantom.
func TestImageWithoutRepoDigestKeysOnManifest(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	f.Pull(repo+":v1", d("m1"), d("c1"), 1)
	f.Untag(repo + "@" + d("m1")) // leaves tag + ID, no repo digest: like `ctr import`
	inv := inventory.New(f, nil)
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)
	im, ok := inv.Get(d("m1"))
	if !ok || im.ImageID != d("c1") || !slices.Equal(im.Tags, []string{repo + ":v1"}) || !slices.Equal(im.Repos, []string{repo}) {
		t.Fatalf("Get(manifest) = %+v, %v", im, ok)
	}
	if _, ok := inv.Get(d("c1")); ok {
		t.Errorf("the image ID is an inventory entry of its own")
	}
	if dg, _ := inv.DigestForTag(repo + ":v1"); dg != d("m1") {
		t.Errorf("DigestForTag = %s, want the manifest digest", dg)
	}
}

func TestContainers(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	f.Pull(repo+":v1", d("m1"), d("c1"), 1)
	f.Pull("registry.test:5000/mirror/api:v1", d("m1b"), d("c1"), 1) // same ID, second digest
	f.Pull(repo+":v2", d("m2"), d("c2"), 1)
	f.Pull("docker.io/library/nginx:latest", d("n"), d("nc"), 1)
	f.SetContainers([]cri.Container{
		{ID: "a", Name: "api", Image: repo + ":v2", ImageRef: d("c2"), ImageID: d("c2"), PodNamespace: "shop", PodName: "api-0"},
		{ID: "b", Name: "api", Image: repo + ":v1", ImageRef: d("c1"), ImageID: d("c1"), PodNamespace: "shop", PodName: "api-1"},
		{ID: "c", Name: "mirror", Image: "registry.test:5000/mirror/api@" + d("m1b"), ImageRef: d("c1"), PodNamespace: "shop", PodName: "m"},
		{ID: "d", Name: "web", Image: "nginx", ImageRef: d("nc"), PodNamespace: "web", PodName: "w"},
	})
	inv := inventory.New(f, nil, inventory.WithContainerResync(10*time.Millisecond))
	sub := inv.Subscribe()
	defer inv.Unsubscribe(sub)
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)

	ids := func(dg string) []string {
		var out []string
		for _, c := range inv.ContainersUsing(dg) {
			out = append(out, c.ID)
		}
		return out
	}
	want := map[string][]string{d("m2"): {"a"}, d("m1"): {"b"}, d("m1b"): {"c"}, d("n"): {"d"}}
	for dg, w := range want {
		if got := ids(dg); !slices.Equal(got, w) {
			t.Errorf("ContainersUsing(%s) = %v, want %v", dg[:15], got, w)
		}
	}
	if im, _ := inv.Get(d("m2")); len(im.Containers) != 1 || im.Containers[0].PodName != "api-0" || im.Containers[0].PodNamespace != "shop" {
		t.Errorf("Get(m2).Containers = %+v", im.Containers)
	}

	// A container set change is picked up by the container relist and
	// notified.
	<-sub
	f.SetContainers(nil)
	eventually(t, 5*time.Second, "containers gone", func() bool { return len(inv.ContainersUsing(d("m2"))) == 0 })
	eventually(t, 5*time.Second, "container change notified", func() bool {
		select {
		case ch := <-sub:
			return ch.Containers && slices.Contains(ch.Digests, d("m2"))
		default:
			return false
		}
	})
}

// TestReconnect: the runtime goes away and comes back; what changed meanwhile
// is found by the relist on reconnect.
func TestReconnect(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	rec := newRecorder()
	inv := inventory.New(f, nil, inventory.WithObserver(rec), inventory.WithBackoff(5*time.Millisecond, 50*time.Millisecond))
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)

	f.SetDown(true)
	eventually(t, 5*time.Second, "runtime down", func() bool { return !inv.RuntimeUp() })
	f.SetDown(false)
	// Pulled while the inventory has no stream (it may still be backing off).
	f.Pull(repo+":during", d("m9"), d("c9"), 1)
	eventually(t, 5*time.Second, "image from the outage", func() bool {
		_, ok := inv.Get(d("m9"))
		return ok
	})
	eventually(t, 5*time.Second, "runtime up", inv.RuntimeUp)
	if got := rec.upHistory(); !slices.Equal(got, []bool{true, false, true}) {
		t.Errorf("RuntimeUp calls = %v, want [true false true]", got)
	}
}

func TestStartsWithRuntimeDown(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	f.SetDown(true)
	rec := newRecorder()
	inv := inventory.New(f, nil, inventory.WithObserver(rec), inventory.WithBackoff(time.Millisecond, 20*time.Millisecond))
	start(t, inv)
	eventually(t, 5*time.Second, "a few attempts", func() bool { return f.Calls("Events") >= 3 })
	if inv.Ready() || inv.RuntimeUp() {
		t.Fatal("ready/up without a runtime")
	}
	f.Pull(repo+":v1", d("m1"), d("c1"), 1)
	f.SetDown(false)
	eventually(t, 5*time.Second, "ready", inv.Ready)
	if got := rec.upHistory(); !slices.Equal(got, []bool{false, true}) {
		t.Errorf("RuntimeUp calls = %v, want [false true]", got)
	}
}

// TestResyncRepairsDroppedEvents: containerd never replays events; the
// periodic relist must find what they would have told.
func TestResyncRepairsDroppedEvents(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	rec := newRecorder()
	inv := inventory.New(f, nil, inventory.WithObserver(rec), inventory.WithResyncInterval(20*time.Millisecond))
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)
	f.DropEvents(true)
	f.Pull(repo+":v1", d("m1"), d("c1"), 1)
	eventually(t, 5*time.Second, "relist finds the image", func() bool {
		_, ok := inv.Get(d("m1"))
		return ok
	})
	if rec.resyncs() < 2 {
		t.Errorf("resyncs = %d", rec.resyncs())
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.repaired != 1 {
		t.Errorf("repaired = %d, want the 1 digest whose events were dropped", rec.repaired)
	}
}

// TestSlowSubscriberNeverStalls: a subscriber that never reads does not stop
// the inventory, and gets everything coalesced when it finally does.
func TestSlowSubscriberNeverStalls(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	inv := inventory.New(f, nil)
	slow := inv.Subscribe()
	defer inv.Unsubscribe(slow)
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)
	const n = 300
	for i := range n {
		f.Pull(fmt.Sprintf("%s:v%d", repo, i), d(fmt.Sprint("m", i)), d(fmt.Sprint("c", i)), 1)
	}
	eventually(t, 10*time.Second, "all images", func() bool { return len(inv.Snapshot()) == n })
	// Everything since it last read is in the one pending change.
	select {
	case ch := <-slow:
		if len(ch.Digests) != n || !ch.Resync {
			t.Errorf("slow subscriber got %d digests (resync %v), want %d and the initial resync", len(ch.Digests), ch.Resync, n)
		}
	default:
		t.Fatal("slow subscriber has nothing pending")
	}
	select {
	case ch := <-slow:
		t.Errorf("a second change was queued: %+v", ch)
	default:
	}
}

func TestObserverSeesEvents(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	rec := newRecorder()
	inv := inventory.New(f, nil, inventory.WithObserver(rec))
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)
	f.Pull(repo+":v1", d("m1"), d("c1"), 1)
	f.Remove(d("c1"))
	eventually(t, 5*time.Second, "3 creates and 3 deletes", func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return rec.topics[cri.TopicImageCreate] == 3 && rec.topics[cri.TopicImageDelete] == 3
	})
}

// BenchmarkRelist10k guards the cost of a full relist of 10,000 images (the
// THREATS scale figure): it must stay a few tens of milliseconds.
func BenchmarkRelist10k(b *testing.B) {
	f := inventorytest.NewFake()
	for i := range 10000 {
		f.Pull(fmt.Sprintf("registry.test/app%d:v1", i), d(fmt.Sprint("m", i)), d(fmt.Sprint("c", i)), 1)
	}
	for b.Loop() {
		inv := inventory.New(f, nil)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- inv.Run(ctx) }()
		for !inv.Ready() {
			time.Sleep(100 * time.Microsecond)
		}
		cancel()
		<-done
	}
}

// laggingCRI answers ImageStatus with "absent" for the first lag calls per
// name, like containerd's CRI plugin whose cache is updated after containerd
// has published the image event.
type laggingCRI struct {
	*inventorytest.Fake
	lag   int
	mu    sync.Mutex
	calls map[string]int
}

func (l *laggingCRI) ImageStatus(ctx context.Context, ref string) (*cri.Image, error) {
	l.mu.Lock()
	l.calls[ref]++
	n := l.calls[ref]
	l.mu.Unlock()
	if n <= l.lag {
		return nil, nil
	}
	return l.Fake.ImageStatus(ctx, ref)
}

// TestEventRetriedWhileCRILags: an event handled before CRI knows the name
// is retried, without waiting for the periodic relist.
func TestEventRetriedWhileCRILags(t *testing.T) {
	t.Parallel()
	rt := &laggingCRI{Fake: inventorytest.NewFake(), lag: 3, calls: map[string]int{}}
	rec := newRecorder()
	inv := inventory.New(rt, nil, inventory.WithObserver(rec), inventory.WithResyncInterval(time.Hour))
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)
	rt.Pull(repo+":v1", d("m1"), d("c1"), 1)
	eventually(t, 5*time.Second, "image after CRI caught up", func() bool {
		dg, ok := inv.DigestForTag(repo + ":v1")
		return ok && dg == d("m1")
	})
	if rec.resyncs() != 1 {
		t.Errorf("resyncs = %d: the retry, not a relist, must have found it", rec.resyncs())
	}
}

// failingStatus fails ImageStatus for one name with a non-connection error.
type failingStatus struct {
	*inventorytest.Fake
	bad string
}

func (f *failingStatus) ImageStatus(ctx context.Context, ref string) (*cri.Image, error) {
	if ref == f.bad {
		return nil, errors.New("invalid reference")
	}
	return f.Fake.ImageStatus(ctx, ref)
}

// TestOddNameDoesNotTakeRuntimeDown: a lookup error that is not a lost
// connection is left to the relist; the runtime stays up and later events
// are still handled.
func TestOddNameDoesNotTakeRuntimeDown(t *testing.T) {
	t.Parallel()
	rt := &failingStatus{Fake: inventorytest.NewFake(), bad: repo + ":odd"}
	rec := newRecorder()
	inv := inventory.New(rt, nil, inventory.WithObserver(rec))
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)
	rt.Pull(repo+":odd", d("m1"), d("c1"), 1)
	rt.Pull(repo+":v2", d("m2"), d("c2"), 1)
	eventually(t, 5*time.Second, "later image", func() bool { _, ok := inv.Get(d("m2")); return ok })
	if got := rec.upHistory(); !slices.Equal(got, []bool{true}) {
		t.Errorf("RuntimeUp calls = %v, want [true]", got)
	}
}

// TestViewFollowsChanges: the shared View is rebuilt after every kind of
// change (event, container relist, full relist) and always equals Snapshot;
// a stale View would publish verdicts for the wrong images.
func TestViewFollowsChanges(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	f.Pull(repo+":v1", d("m1"), d("c1"), 1)
	inv := inventory.New(f, nil, inventory.WithContainerResync(10*time.Millisecond), inventory.WithResyncInterval(time.Hour))
	start(t, inv)
	same := func() bool { return fmt.Sprint(inv.View()) == fmt.Sprint(inv.Snapshot()) }
	eventually(t, 5*time.Second, "first list", func() bool { return len(inv.View()) == 1 && same() })

	f.Pull(repo+":v2", d("m2"), d("c2"), 1) // an event
	eventually(t, 5*time.Second, "the pulled image in View", func() bool { return len(inv.View()) == 2 && same() })

	f.SetContainers([]cri.Container{{ID: "a", Name: "api", Image: repo + ":v2", ImageRef: d("c2"), ImageID: d("c2"), PodNamespace: "ns", PodName: "p"}})
	eventually(t, 5*time.Second, "the container in View", func() bool {
		v := inv.View()
		return len(v) == 2 && len(v[slices.IndexFunc(v, func(i inventory.Image) bool { return i.Digest == d("m2") })].Containers) == 1 && same()
	})

	// A change only the periodic relist sees.
	f2 := inventorytest.NewFake()
	f2.Pull(repo+":v1", d("m1"), d("c1"), 1)
	inv2 := inventory.New(f2, nil, inventory.WithResyncInterval(20*time.Millisecond))
	start(t, inv2)
	eventually(t, 5*time.Second, "first list", func() bool { return len(inv2.View()) == 1 })
	f2.DropEvents(true)
	f2.Pull(repo+":v2", d("m2"), d("c2"), 1)
	eventually(t, 5*time.Second, "the relisted image in View", func() bool {
		return len(inv2.View()) == 2 && fmt.Sprint(inv2.View()) == fmt.Sprint(inv2.Snapshot())
	})
}

// A relist of images with one repo digest each never lists containerd's
// image records (CRI's own list says where their tags point); images that
// need targets get single lookups, and past maxTargetLookups one list.
func TestRelistListsTargetsOnlyWhenNeeded(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	for i := range 5 {
		f.Pull(fmt.Sprintf("%s-%d:v1", repo, i), d(fmt.Sprintf("m%d", i)), d(fmt.Sprintf("c%d", i)), 1)
	}
	f.Pull(repo+":imported", d("mi"), d("ci"), 1)
	f.Untag(repo + "@" + d("mi")) // no repo digest: needs its targets
	inv := inventory.New(f, nil)
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)
	if n := f.Calls("ImageTargets"); n != 0 {
		t.Errorf("%d full containerd image lists for images that need none", n)
	}
	if n := f.Calls("ImageTarget"); n != 2 { // the imported image's ID and tag
		t.Errorf("%d single target lookups, want 2", n)
	}
	if dg, _ := inv.DigestForTag(repo + ":imported"); dg != d("mi") {
		t.Errorf("imported tag -> %s, want its manifest", dg)
	}
	for i := range 5 {
		if dg, _ := inv.DigestForTag(fmt.Sprintf("%s-%d:v1", repo, i)); dg != d(fmt.Sprintf("m%d", i)) {
			t.Errorf("tag %d -> %s", i, dg)
		}
	}
}

// A container start or stop is seen from containerd's task events, long
// before the container relist (an hour here) would see it.
func TestContainerEventsSeenFast(t *testing.T) {
	t.Parallel()
	f := inventorytest.NewFake()
	f.Pull(repo+":v1", d("m1"), d("c1"), 1)
	inv := inventory.New(f, nil, inventory.WithContainerResync(time.Hour), inventory.WithResyncInterval(time.Hour))
	sub := inv.Subscribe()
	defer inv.Unsubscribe(sub)
	start(t, inv)
	eventually(t, 5*time.Second, "ready", inv.Ready)
	<-sub

	tests := []struct {
		name    string
		change  func()
		running int
	}{
		{"start", func() {
			f.StartContainer(cri.Container{ID: "a", Name: "api", Image: repo + ":v1", ImageRef: d("c1"), ImageID: d("c1"), PodNamespace: "shop", PodName: "api-0"})
		}, 1},
		{"stop", func() { f.StopContainer("a") }, 0},
	}
	for _, tt := range tests {
		tt.change()
		eventually(t, 5*time.Second, tt.name+" seen", func() bool { return len(inv.ContainersUsing(d("m1"))) == tt.running })
		eventually(t, 5*time.Second, tt.name+" notified", func() bool {
			select {
			case ch := <-sub:
				return ch.Containers && slices.Contains(ch.Digests, d("m1"))
			default:
				return false
			}
		})
	}
}
