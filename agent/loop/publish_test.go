package loop_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/loop"
	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

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
		if v := verdicts(pub.Last())[verdict.Verified]; v != 3 {
			t.Errorf("the interval publish shows %d verified, want 3", v)
		}
		before := time.Now()
		close(block)
		synctest.Wait()
		if !time.Now().Equal(before) {
			t.Errorf("the drained queue was published after %s, want at once", time.Since(before))
		}
		if v := verdicts(pub.Last())[verdict.Verified]; v != n {
			t.Errorf("the last publish shows %d verified, want %d", v, n)
		}
		if img, _ := imageByDigest(l, dg(n-1)); img.Result.Verdict != verdict.Verified {
			t.Errorf("the state shows %s for the last digest, want verified", img.Result.Verdict)
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
					if s := pub.Last(); s != nil && allVerified(s, n) {
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

// allVerified reports whether st holds n images, all verified; it stops at
// the first that is not, so polling it costs the benchmark little.
func allVerified(st *nodestate.State, n int) bool {
	if len(st.Images) != n {
		return false
	}
	for i := range st.Images {
		if st.Images[i].Result.Verdict != verdict.Verified {
			return false
		}
	}
	return true
}
