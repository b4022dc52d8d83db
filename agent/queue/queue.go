// Package queue is the agent's work queue of image digests: keyed,
// coalescing, bounded, with delayed retries.
//
// A key added while it waits is merged with the waiting entry; a key added
// while a worker processes it is processed once more after Done. Adds beyond
// the capacity are dropped and counted (the periodic relist re-queues them).
package queue

import (
	"container/heap"
	"context"
	"sync"
	"time"
)

// Queue is safe for concurrent use. Create it with New.
type Queue struct {
	capacity  int
	onDropped func()

	mu sync.Mutex // guards every field below
	// order holds waiting keys in FIFO order; waiting mirrors it for lookups.
	order      []string
	waiting    map[string]bool
	processing map[string]bool
	// again marks keys added while processing: re-queued on Done.
	again map[string]bool
	// delays holds the keys of AddAfter by due time (a min-heap, indexed by
	// key); one timer fires for the earliest. One runtime timer per key
	// would cost ~300 bytes each: every verified digest waits here for its
	// cache expiry.
	delays   delayHeap
	delayed  map[string]*delayItem
	timer    *time.Timer // nil until the first AddAfter
	shutdown bool
	notify   chan struct{} // closed and replaced when keys arrive
}

// New returns a queue holding at most capacity waiting keys. onDropped, if
// not nil, is called (outside the lock) for every dropped key.
func New(capacity int, onDropped func()) *Queue {
	return &Queue{
		capacity:   capacity,
		onDropped:  onDropped,
		waiting:    map[string]bool{},
		processing: map[string]bool{},
		again:      map[string]bool{},
		delayed:    map[string]*delayItem{},
		notify:     make(chan struct{}),
	}
}

// Add queues key unless it is already waiting. It reports false when the
// queue was full or shut down and the key was dropped.
func (q *Queue) Add(key string) bool {
	q.mu.Lock()
	ok := q.addLocked(key)
	q.mu.Unlock()
	if !ok && q.onDropped != nil {
		q.onDropped()
	}
	return ok
}

func (q *Queue) addLocked(key string) bool {
	if q.shutdown {
		return false
	}
	if q.waiting[key] {
		return true
	}
	if q.processing[key] {
		q.again[key] = true
		return true
	}
	if len(q.order) >= q.capacity {
		return false
	}
	q.order = append(q.order, key)
	q.waiting[key] = true
	close(q.notify)
	q.notify = make(chan struct{})
	return true
}

// AddAfter queues key after delay d (a retry). A later AddAfter for the same
// key replaces the earlier one; Add makes it due at once.
func (q *Queue) AddAfter(key string, d time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.shutdown {
		return
	}
	var first time.Time // due time the timer is armed for, zero if none
	if len(q.delays) > 0 {
		first = q.delays[0].due
	}
	due := time.Now().Add(d)
	if it, ok := q.delayed[key]; ok {
		it.due = due
		heap.Fix(&q.delays, it.index)
	} else {
		it := &delayItem{key: key, due: due}
		q.delayed[key] = it
		heap.Push(&q.delays, it)
	}
	if !q.delays[0].due.Equal(first) {
		q.armLocked() // the earliest due time changed
	}
}

// armLocked sets the timer for the earliest delayed key.
func (q *Queue) armLocked() {
	if len(q.delays) == 0 {
		if q.timer != nil {
			q.timer.Stop()
		}
		return
	}
	d := time.Until(q.delays[0].due)
	if q.timer == nil {
		q.timer = time.AfterFunc(d, q.fire)
		return
	}
	q.timer.Reset(d)
}

// fire queues every delayed key that is due and re-arms the timer.
func (q *Queue) fire() {
	q.mu.Lock()
	if q.shutdown {
		q.mu.Unlock()
		return
	}
	now := time.Now()
	dropped := 0
	for len(q.delays) > 0 && !q.delays[0].due.After(now) {
		it := heap.Pop(&q.delays).(*delayItem)
		delete(q.delayed, it.key)
		if !q.addLocked(it.key) {
			dropped++
		}
	}
	if len(q.delays) == 0 && len(q.delayed) == 0 {
		q.delays, q.delayed = nil, map[string]*delayItem{} // let a drained burst's memory go
	}
	q.armLocked()
	q.mu.Unlock()
	if q.onDropped != nil {
		for range dropped {
			q.onDropped()
		}
	}
}

type delayItem struct {
	key   string
	due   time.Time
	index int // in delayHeap
}

// delayHeap is a container/heap of delayed keys, earliest first.
type delayHeap []*delayItem

func (h delayHeap) Len() int           { return len(h) }
func (h delayHeap) Less(i, j int) bool { return h[i].due.Before(h[j].due) }
func (h delayHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *delayHeap) Push(x any) {
	it := x.(*delayItem)
	it.index = len(*h)
	*h = append(*h, it)
}
func (h *delayHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return it
}

// Get blocks until a key is available or ctx is done. The caller must call
// Done(key) when finished with it.
func (q *Queue) Get(ctx context.Context) (string, bool) {
	for {
		q.mu.Lock()
		if q.shutdown {
			q.mu.Unlock()
			return "", false
		}
		if len(q.order) > 0 {
			key := q.order[0]
			q.order[0] = ""
			q.order = q.order[1:]
			delete(q.waiting, key)
			q.processing[key] = true
			q.mu.Unlock()
			return key, true
		}
		wait := q.notify
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			return "", false
		case <-wait:
		}
	}
}

// Done marks key processed; if it was added meanwhile, it is queued again.
func (q *Queue) Done(key string) {
	q.mu.Lock()
	delete(q.processing, key)
	readd := q.again[key]
	delete(q.again, key)
	ok := true
	if readd {
		ok = q.addLocked(key)
	}
	q.mu.Unlock()
	if !ok && q.onDropped != nil {
		q.onDropped()
	}
}

// Len is the number of waiting keys.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.order)
}

// ShutDown stops the queue: pending timers are cancelled, Get returns false.
func (q *Queue) ShutDown() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.shutdown {
		return
	}
	q.shutdown = true
	if q.timer != nil {
		q.timer.Stop()
	}
	q.delays, q.delayed = nil, nil
	close(q.notify)
}
