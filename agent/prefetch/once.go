package prefetch

import (
	"context"
	"sync"
	"time"

	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// Once prefetches ps one-shot: each pin as in Run, a failed attempt retried
// up to Options.OnceAttempts times with backoff. progress (may be nil) gets
// every phase and result, one call at a time. Outcomes are in the order of
// ps. Metrics and events are reported as in Run when configured.
func (p *Prefetcher) Once(ctx context.Context, ps []pins.Pin, progress func(Event)) []Outcome {
	var pmu sync.Mutex
	send := func(ev Event) {
		if progress == nil {
			return
		}
		pmu.Lock()
		defer pmu.Unlock()
		progress(ev)
	}
	out := make([]Outcome, len(ps))
	sem := make(chan struct{}, p.opts.Concurrency)
	var wg sync.WaitGroup
	for i, pin := range ps {
		wg.Go(func() {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				out[i] = Outcome{Pin: pin, Result: ResultFailed, Verdict: verdict.Pending, Reason: verdict.ReasonQueued, Detail: ctx.Err().Error()}
				send(Event{Pin: pin, Phase: ResultFailed, Outcome: &out[i]})
				return
			}
			defer func() { <-sem }()
			out[i] = p.once(ctx, pin, send)
		})
	}
	wg.Wait()
	return out
}

func (p *Prefetcher) once(ctx context.Context, pin pins.Pin, send func(Event)) Outcome {
	var o Outcome
	backoff := p.retryBackoff()
	for attempt := 1; ; attempt++ {
		o = p.process(ctx, pin, func(phase string) { send(Event{Pin: pin, Phase: phase}) })
		o.Attempts = attempt
		if o.Result != ResultFailed || attempt >= p.opts.OnceAttempts || ctx.Err() != nil {
			break
		}
		send(Event{Pin: pin, Phase: PhaseRetrying})
		t := time.NewTimer(backoff.Step())
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
	p.observe(o)
	p.report(o, true)
	send(Event{Pin: pin, Phase: o.Result, Outcome: &o})
	return o
}
