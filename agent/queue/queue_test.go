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
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
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

func TestConcurrentWorkersNeverShareAKey(t *testing.T) {
	t.Parallel()
	q := New(1000, nil)
	ctx, cancel := context.WithCancel(t.Context())
	var inflight sync.Map
	var processed atomic.Int32
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				k, ok := q.Get(ctx)
				if !ok {
					return
				}
				if _, dup := inflight.LoadOrStore(k, true); dup {
					t.Errorf("key %s processed twice at once", k)
				}
				time.Sleep(50 * time.Microsecond)
				inflight.Delete(k)
				processed.Add(1)
				q.Done(k)
			}
		}()
	}
	for i := range 2000 {
		q.Add(string(rune('a' + i%7)))
	}
	deadline := time.Now().Add(5 * time.Second)
	for q.Len() > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	cancel()
	wg.Wait()
	if processed.Load() == 0 {
		t.Fatal("nothing processed")
	}
}
