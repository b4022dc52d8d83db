package loop_test

import (
	"context"
	"maps"
	"slices"
	"sort"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/loop"
	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

func TestLoopJudgesEveryDigest(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		inv := newInventory(
			inventory.Image{Digest: dg(1), Repos: []string{"registry.example.com/a"}, Tags: []string{"registry.example.com/a:v1"}},
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
		imgs := l.State().Images
		if len(imgs) != len(want) {
			t.Fatalf("State() has %d images, want %d: %+v", len(imgs), len(want), imgs)
		}
		for d, v := range want {
			img, ok := imageByDigest(l, d)
			if !ok || img.Result.Verdict != v {
				t.Errorf("%s: %+v, want verdict %s", d, img, v)
			}
		}
		if img, _ := imageByDigest(l, dg(4)); img.Result.Reason != verdict.ReasonNoPolicy || img.Name != dg(40) {
			t.Errorf("nameless image: reason %q name %q, want no-policy named by its ID", img.Result.Reason, img.Name)
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
		if got := verdicts(st); !maps.Equal(got, wantCounts) {
			t.Errorf("published verdicts %v, want %v", got, wantCounts)
		}
		rep.mu.Lock()
		if rep.last != st {
			t.Errorf("the reporter got another state than metrics and status")
		}
		rep.mu.Unlock()
		if l.State() != st {
			t.Errorf("State() is not the published state")
		}

		// A digest that leaves the node leaves the state.
		inv.Remove(dg(2))
		l.Resync()
		synctest.Wait()
		if _, ok := imageByDigest(l, dg(2)); ok || len(l.State().Images) != 3 {
			t.Errorf("removed digest still listed: %+v", l.State().Images)
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
				// One repo through a repo digest, the other through a tag
				// (the inventory lists the repositories of both).
				inv := newInventory(inventory.Image{Digest: dg(1), Repos: []string{a, b}, Tags: []string{b + ":v1"}})
				j := &fakeJudger{fn: byRepo(map[string]verdict.Verdict{a: tt.a, b: tt.b})}
				l := loop.New(inv, j, nil, discard(), loop.Options{})
				stop := start(t, l)
				defer stop()
				l.Changed(dg(1))
				synctest.Wait()
				img, ok := imageByDigest(l, dg(1))
				if !ok || img.Result.Verdict != tt.want || img.Result.Reason != tt.wantReason {
					t.Errorf("got %s/%s, want %s/%s", img.Result.Verdict, img.Result.Reason, tt.want, tt.wantReason)
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

		if pub.Last() == nil {
			t.Fatal("nothing published")
		}
		img, _ := imageByDigest(l, dg(1))
		wantPins := []nodestate.TagPin{{Tag: tag, Digest: pinned}}
		if !img.Drifted() || !slices.Equal(img.Pins, wantPins) || img.Running != 2 || !slices.Equal(img.Pods, []string{"shop/api-1"}) ||
			img.Result.Verdict != verdict.Unverified {
			t.Errorf("the drifted, running image: %+v", img)
		}
		img, _ = imageByDigest(l, dg(2))
		if img.Drifted() || img.PinnedDigest() != dg(2) {
			t.Errorf("the pinned, matching image: %+v", img)
		}

		// New pins that match end the drift.
		l.SetPins([]pins.Pin{{Repo: "registry.example.com/shop/api", Tag: "v2", Digest: dg(1)}})
		synctest.Wait()
		if img, _ := imageByDigest(l, dg(1)); img.Drifted() || pub.Last() != l.State() {
			t.Errorf("after repinning: %+v", img)
		}
	})
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
	if img, ok := imageByDigest(l, dg(1)); ok && img.Result.Reason != verdict.ReasonQueued {
		t.Errorf("abandoned judgement published: %+v", img)
	}
	// After shutdown, Changed neither blocks nor starts work.
	l.Changed(dg(1))
	if n := j.CallsFor(dg(1)); n != 1 {
		t.Errorf("judged %d times, want 1", n)
	}
}
