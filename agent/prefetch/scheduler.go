package prefetch

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/pinwarden/pinwarden/agent/pins"
)

// SetPins replaces the pins Run works on: new pins start at once, removed
// pins stop (an attempt in flight is cancelled), and pins that were rejected
// or failing are tried again now (a reload may have changed the policies).
func (p *Prefetcher) SetPins(ps []pins.Pin) {
	want := make(map[string]pins.Pin, len(ps))
	for _, pin := range ps {
		want[pin.Ref()] = pin
	}
	p.mu.Lock()
	for k, it := range p.items {
		if _, ok := want[k]; !ok {
			if it.cancel != nil {
				it.cancel()
			}
			delete(p.items, k)
		}
	}
	for k, pin := range want {
		it, ok := p.items[k]
		if !ok {
			p.items[k] = &item{pin: pin}
			continue
		}
		it.pin = pin
		switch {
		case it.running:
			it.again = true // its answer may predate the new policies
		case it.last != nil && (it.last.Result == ResultRejected || it.last.Result == ResultFailed):
			it.due, it.fails = time.Time{}, 0
		}
	}
	p.observePending()
	p.mu.Unlock()
	p.poke()
}

func (p *Prefetcher) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// errRunning means Run was called while another Run was active.
var errRunning = errors.New("prefetch: Run is already running")

// Run prefetches the pins of SetPins until ctx is done, then waits for the
// attempts in flight to end and returns nil.
func (p *Prefetcher) Run(ctx context.Context) error {
	if !p.running.CompareAndSwap(false, true) {
		return errRunning
	}
	defer p.running.Store(false)
	var wg sync.WaitGroup
	defer wg.Wait()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := p.dispatch(ctx, &wg)
		wait := time.Hour
		if !next.IsZero() {
			wait = max(next.Sub(p.now()), time.Millisecond)
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return nil
		case <-p.wake:
		case <-timer.C:
		}
	}
}

// dispatch starts the due pins that fit under the concurrency bound,
// earliest first, and returns when the next not-started pin is due (zero:
// none is waiting on time).
func (p *Prefetcher) dispatch(ctx context.Context, wg *sync.WaitGroup) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	busy := 0
	var ready []*item
	var next time.Time
	for _, it := range p.items {
		switch {
		case it.running:
			busy++
		case !it.due.After(now):
			ready = append(ready, it)
		case next.IsZero() || it.due.Before(next):
			next = it.due
		}
	}
	slices.SortFunc(ready, func(a, b *item) int {
		return cmp.Or(a.due.Compare(b.due), strings.Compare(a.pin.Ref(), b.pin.Ref()))
	})
	for _, it := range ready {
		if busy >= p.opts.Concurrency {
			break // a finishing attempt pokes Run
		}
		busy++
		ictx, cancel := context.WithCancel(ctx)
		it.running, it.cancel = true, cancel
		wg.Go(func() {
			defer cancel()
			o := p.process(ictx, it.pin, func(string) {})
			p.finish(ictx, it, o)
		})
	}
	p.observePending()
	return next
}

// finish records an attempt of Run: metrics, events on transitions, and when
// to try again.
func (p *Prefetcher) finish(ctx context.Context, it *item, o Outcome) {
	p.mu.Lock()
	defer p.mu.Unlock()
	defer p.poke()
	it.running, it.cancel = false, nil
	if p.items[it.pin.Ref()] != it || ctx.Err() != nil {
		return // removed, or shutting down: not a judgement of the pin
	}
	o.Attempts = it.fails + 1
	p.observe(o)
	changed := it.last == nil || it.last.Result != o.Result || it.last.Reason != o.Reason
	p.report(o, changed)
	now := p.now()
	if o.Result == ResultFailed {
		if it.fails == 0 {
			it.backoff = p.retryBackoff()
		}
		it.due = now.Add(it.backoff.Step())
		it.fails++
	} else {
		it.due = now.Add(p.opts.Recheck)
		it.fails = 0
	}
	if it.again && (o.Result == ResultRejected || o.Result == ResultFailed) {
		it.due, it.fails = now, 0
	}
	it.again = false
	it.last = &o
	p.observePending()
}

// observePending publishes the number of pins not known to be on the node.
// The caller holds p.mu.
func (p *Prefetcher) observePending() {
	if p.opts.Observer == nil {
		return
	}
	n := 0
	for _, it := range p.items {
		if it.last == nil || (it.last.Result != ResultPresent && it.last.Result != ResultPulled) {
			n++
		}
	}
	p.opts.Observer.PrefetchPending(n)
}
