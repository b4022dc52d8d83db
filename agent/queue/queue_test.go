package queue

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

func TestCoalesces(t *testing.T) {
	t.Parallel()
	q := New(10, nil)
	q.Add("a")
	q.Add("b")
	q.Add("a")
	if q.Len() != 2 {
		t.Fatalf("len = %d, want 2", q.Len())
	}
	k, _ := q.Get(t.Context())
	if k != "a" {
		t.Fatalf("first = %q, want a (FIFO)", k)
	}
	// Added while processing: processed again after Done, not concurrently.
	q.Add("a")
	if q.Len() != 1 {
		t.Fatalf("a was queued while processing: len = %d", q.Len())
	}
	q.Done("a")
	if q.Len() != 2 {
		t.Fatalf("a not re-queued after Done: len = %d", q.Len())
	}
}

func TestBoundedAndCountsDrops(t *testing.T) {
	t.Parallel()
	var dropped atomic.Int32
	q := New(3, func() { dropped.Add(1) })
	for _, k := range []string{"a", "b", "c", "d", "e", "a"} {
		q.Add(k)
	}
	if q.Len() != 3 || dropped.Load() != 2 {
		t.Fatalf("len = %d dropped = %d, want 3 and 2", q.Len(), dropped.Load())
	}
}

func TestGetHonoursContextAndShutdown(t *testing.T) {
	t.Parallel()
	q := New(1, nil)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, ok := q.Get(ctx); ok {
		t.Fatal("Get on empty queue returned a key")
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if _, ok := q.Get(t.Context()); ok {
			t.Error("Get after ShutDown returned a key")
		}
	}()
	q.ShutDown()
	wg.Wait()
	if q.Add("x") {
		t.Error("Add after ShutDown accepted a key")
	}
}

func TestAddAfter(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		q := New(10, nil)
		q.AddAfter("a", time.Minute)
		q.AddAfter("a", 2*time.Minute) // replaces the first timer
		time.Sleep(90 * time.Second)
		synctest.Wait()
		if q.Len() != 0 {
			t.Fatal("retry fired early")
		}
		time.Sleep(31 * time.Second)
		synctest.Wait()
		if q.Len() != 1 {
			t.Fatalf("retry did not fire: len = %d", q.Len())
		}
		q.ShutDown()
	})
}

// TestConcurrentWorkersNeverShareAKey: four workers never hold one key at
// once, and every Add is seen: the last processing of each key starts after
// its last Add (coalescing may merge Adds, never lose one).
func TestConcurrentWorkersNeverShareAKey(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		const nKeys, nAdds = 7, 2000
		q := New(1000, nil)
		ctx, cancel := context.WithCancel(t.Context())
		var (
			mu       sync.Mutex // guards every map below
			inflight = map[string]bool{}
			version  = map[string]int{} // bumped before each Add of the key
			seen     = map[string]int{} // highest version a processing started with
			runs     int
		)
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for {
					k, ok := q.Get(ctx)
					if !ok {
						return
					}
					mu.Lock()
					if inflight[k] {
						t.Errorf("key %s processed twice at once", k)
					}
					inflight[k] = true
					seen[k] = max(seen[k], version[k])
					runs++
					mu.Unlock()
					time.Sleep(50 * time.Microsecond) // work, in the bubble's time
					mu.Lock()
					inflight[k] = false
					mu.Unlock()
					q.Done(k)
				}
			})
		}
		for i := range nAdds {
			k := string(rune('a' + i%nKeys))
			mu.Lock()
			version[k]++
			mu.Unlock()
			q.Add(k)
		}
		synctest.Wait() // every worker idle in Get: the queue has drained
		cancel()
		wg.Wait()
		if q.Len() != 0 {
			t.Errorf("%d keys left in the queue", q.Len())
		}
		for i := range nKeys {
			k := string(rune('a' + i))
			if seen[k] != version[k] {
				t.Errorf("key %s: last processing saw Add #%d of %d", k, seen[k], version[k])
			}
		}
		if runs < nKeys || runs > nAdds {
			t.Errorf("%d processings for %d Adds of %d keys", runs, nAdds, nKeys)
		}
	})
}

// TestAddAfterManyKeys: delayed keys share one timer; each becomes due at
// its own time, in due order, whatever order they were added in, and an
// earlier AddAfter for a key that waits already brings it forward.
func TestAddAfterManyKeys(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		var dropped atomic.Int32
		q := New(3, func() { dropped.Add(1) })
		defer q.ShutDown()
		q.AddAfter("c", 3*time.Second)
		q.AddAfter("a", 1*time.Second)
		q.AddAfter("b", 2*time.Second)
		q.AddAfter("d", 10*time.Second)
		q.AddAfter("d", 4*time.Second) // brought forward
		q.AddAfter("e", 4*time.Second) // due with d; the queue is full by then
		for i, want := range []string{"a", "b", "c"} {
			time.Sleep(time.Second)
			synctest.Wait()
			if q.Len() != i+1 {
				t.Fatalf("after %ds: len = %d, want %d", i+1, q.Len(), i+1)
			}
			q.mu.Lock()
			got := q.order[i]
			q.mu.Unlock()
			if got != want {
				t.Fatalf("after %ds: key %q due, want %q", i+1, got, want)
			}
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if q.Len() != 3 || dropped.Load() != 2 {
			t.Fatalf("after 4s: len = %d, dropped = %d; want 3 and 2 (d and e into a full queue)", q.Len(), dropped.Load())
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		if dropped.Load() != 2 {
			t.Fatalf("d fired again from its replaced delay: dropped = %d", dropped.Load())
		}
	})
}
