// Package queue is the agent's work queue of image digests: keyed,
// coalescing, bounded, with delayed retries.
//
// A key added while it waits is merged with the waiting entry; a key added
// while a worker processes it is processed once more after Done. Adds beyond
// the capacity are dropped and counted (the periodic relist re-queues them).
package queue

import (
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
	again    map[string]bool
	timers   map[string]*time.Timer
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
		timers:     map[string]*time.Timer{},
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
// key replaces the earlier timer; Add makes it due at once.
func (q *Queue) AddAfter(key string, d time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.shutdown {
		return
	}
	if t, ok := q.timers[key]; ok {
		t.Stop()
	}
	q.timers[key] = time.AfterFunc(d, func() {
		q.mu.Lock()
		delete(q.timers, key)
		q.mu.Unlock()
		q.Add(key)
	})
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
	for k, t := range q.timers {
		t.Stop()
		delete(q.timers, k)
	}
	close(q.notify)
}
