// Package prefetch puts pinned digests on the node before pods ask for them,
// so that an IfNotPresent pod starts without a pull. Every pin is verified by
// digest first (the judge: verdict cache, then registry); only a verified
// digest is pulled, as repo@digest through CRI, with the credentials of the
// pin's own registry host. Unverified and untrusted pins are never pulled;
// pending ones are retried with capped, jittered backoff.
//
// Pulls run with bounded concurrency and never two of the same digest at
// once. A Prefetcher follows pin changes live (SetPins) while Run runs, and
// Once does the same work one-shot for `pinwarden prefetch`.
package prefetch

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/cri"
)

// Judger decides the verdict of one digest; *judge.Judge is one.
type Judger interface {
	Judge(ctx context.Context, repo, digest string) verdict.Result
}

// Runtime is the part of the container runtime prefetch uses; *cri.Client
// is one.
type Runtime interface {
	// ImageStatus returns nil and no error when ref is not on the node.
	ImageStatus(ctx context.Context, ref string) (*cri.Image, error)
	PullImage(ctx context.Context, ref string, auth *cri.Auth) (string, error)
	// PinImage labels the image so that kubelet's image GC keeps it.
	PinImage(ctx context.Context, name string) error
}

var _ Runtime = (*cri.Client)(nil)

// Observer is told about every prefetch attempt (metrics); *metrics.Metrics
// is one.
type Observer interface {
	Prefetch(result string, took time.Duration)
	PrefetchPending(n int)
}

// Events receives Kubernetes events about the node; *report.Reporter is one.
type Events interface {
	Event(eventtype, reason, message string)
}

// Credentials gives the registry credentials of one host; *verify.Verifier
// is one (it reads registries.dockerConfig).
type Credentials interface {
	Credentials(host string) (authn.AuthConfig, bool)
}

// Results of one attempt: the values of pinwarden_prefetch_total{result}.
const (
	ResultPresent  = "present"  // already on the node: nothing pulled
	ResultPulled   = "pulled"   // verified, then pulled
	ResultRejected = "rejected" // unverified or untrusted: not pulled
	ResultFailed   = "failed"   // pending verdict, runtime or pull error: retried
)

// Phases reported to Once's progress callback before the result.
const (
	PhaseChecking  = "checking"  // asking the runtime whether the digest is there
	PhaseVerifying = "verifying" // judging the digest
	PhasePulling   = "pulling"   // pulling repo@digest through CRI
	PhaseRetrying  = "retrying"  // waiting before another attempt
)

// Reasons of failed outcomes that are not verdict reasons.
const (
	ReasonRuntimeError = "runtime-error" // the runtime could not be asked
	ReasonPullFailed   = "pull-failed"   // the runtime's pull failed
)

// Outcome is the result of prefetching one pin.
type Outcome struct {
	Pin      pins.Pin
	Result   string          // one of the Result* constants
	Verdict  verdict.Verdict // "" when the digest was present (not judged) or the runtime failed first
	Reason   string          // verdict reason, or ReasonRuntimeError / ReasonPullFailed
	Detail   string          // human-readable; never a metric label
	ImageID  string          // the image ID when present or pulled
	Took     time.Duration
	Attempts int
}

// Event is one step of Once's progress: a Phase* constant, or the final
// Result* constant with Outcome set.
type Event struct {
	Pin     pins.Pin
	Phase   string
	Outcome *Outcome
}

// Options configure a Prefetcher. Zero values take the defaults noted.
type Options struct {
	// Concurrency bounds the pins worked on (verified and pulled) at once (default 4).
	Concurrency int
	// PinGC labels prefetched (and already present) pinned images
	// io.cri-containerd.pinned=pinned so that kubelet's image GC keeps them.
	PinGC bool
	// RetryBase and RetryMax bound the backoff after a failed attempt
	// (defaults 2s and 5m; doubling, each wait plus up to 10% jitter).
	RetryBase, RetryMax time.Duration
	// Recheck is how often Run checks again a pin that is present, pulled or
	// rejected: the image may have been removed, the signature added
	// (default 5m).
	Recheck time.Duration
	// OnceAttempts bounds the attempts per pin in Once (default 3).
	OnceAttempts int
	// PullTimeout bounds one pull (default 15m), so a stuck pull cannot hold
	// a concurrency slot for ever.
	PullTimeout time.Duration
	// Credentials for pulls; nil: anonymous.
	Credentials Credentials
	// Observer and Events may be nil.
	Observer Observer
	Events   Events
}

func (o *Options) defaults() {
	if o.Concurrency < 1 {
		o.Concurrency = 4
	}
	if o.RetryBase <= 0 {
		o.RetryBase = 2 * time.Second
	}
	if o.RetryMax <= 0 {
		o.RetryMax = 5 * time.Minute
	}
	o.RetryMax = max(o.RetryMax, o.RetryBase)
	if o.Recheck <= 0 {
		o.Recheck = 5 * time.Minute
	}
	if o.OnceAttempts < 1 {
		o.OnceAttempts = 3
	}
	if o.PullTimeout <= 0 {
		o.PullTimeout = 15 * time.Minute
	}
}

// Prefetcher prefetches pins. It is safe for concurrent use.
type Prefetcher struct {
	judge   Judger
	rt      Runtime
	log     *slog.Logger
	opts    Options
	now     func() time.Time
	digests keyLock
	wake    chan struct{}
	running atomic.Bool

	mu    sync.Mutex       // guards items
	items map[string]*item // by pin.Ref()
}

// item is one pin's state in Run; guarded by Prefetcher.mu.
type item struct {
	pin     pins.Pin
	running bool
	cancel  context.CancelFunc // cancels the running attempt
	due     time.Time          // next attempt; zero: now
	fails   int                // consecutive failed attempts
	backoff wait.Backoff       // the waits after failed attempts; reset on success
	last    *Outcome           // last finished attempt
	again   bool               // SetPins asked for a new attempt while one was running
}

// New returns a Prefetcher that judges with j and pulls through rt.
func New(j Judger, rt Runtime, logger *slog.Logger, opts Options) *Prefetcher {
	opts.defaults()
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Prefetcher{
		judge: j, rt: rt, log: logger, opts: opts, now: time.Now,
		digests: keyLock{held: map[string]chan struct{}{}},
		wake:    make(chan struct{}, 1),
		items:   map[string]*item{},
	}
}

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

// retryBackoff is the backoff after failed attempts at one pin: RetryBase,
// doubling up to RetryMax, each wait plus up to 10% jitter.
func (p *Prefetcher) retryBackoff() wait.Backoff {
	return wait.Backoff{Duration: p.opts.RetryBase, Factor: 2, Jitter: 0.1, Steps: math.MaxInt32, Cap: p.opts.RetryMax}
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

func (p *Prefetcher) observe(o Outcome) {
	if p.opts.Observer == nil {
		return
	}
	var took time.Duration
	if o.Result == ResultPulled {
		took = o.Took
	}
	p.opts.Observer.Prefetch(o.Result, took)
}

// report logs an outcome and sends its event: ImagePrefetched for every
// pull, ImagePrefetchFailed when a pin turns rejected or failed (or changes
// reason), not on every retry.
func (p *Prefetcher) report(o Outcome, changed bool) {
	ref := o.Pin.String()
	switch o.Result {
	case ResultPulled:
		p.log.Info("prefetched pinned image", "image", ref, "verdict", o.Verdict, "took", o.Took)
		p.event(verdict.EventTypeNormal, verdict.EventImagePrefetched, fmt.Sprintf("Prefetched %s (verdict %s) in %s", ref, o.Verdict, o.Took.Round(time.Millisecond)))
	case ResultRejected, ResultFailed:
		if !changed {
			p.log.Debug("prefetch still not possible", "image", ref, "result", o.Result, "reason", o.Reason)
			return
		}
		p.log.Warn("pinned image not prefetched", "image", ref, "result", o.Result, "verdict", o.Verdict, "reason", o.Reason, "detail", o.Detail)
		p.event(verdict.EventTypeWarning, verdict.EventImagePrefetchFailed, failMessage(o))
	}
}

func failMessage(o Outcome) string {
	ref := o.Pin.String()
	switch {
	case o.Result == ResultRejected:
		return fmt.Sprintf("Not pulling %s: verdict %s (%s)", ref, o.Verdict, o.Reason)
	case o.Verdict == verdict.Pending:
		return fmt.Sprintf("Not pulling %s yet: verdict pending (%s); retrying", ref, o.Reason)
	default:
		return fmt.Sprintf("Prefetch of %s failed (%s): %s; retrying", ref, o.Reason, o.Detail)
	}
}

func (p *Prefetcher) event(eventtype, reason, msg string) {
	if p.opts.Events != nil {
		p.opts.Events.Event(eventtype, reason, msg)
	}
}

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

// process makes one attempt at one pin: present? judge; verified (or
// ignored by policy)? pull by digest, then pin against GC.
func (p *Prefetcher) process(ctx context.Context, pin pins.Pin, phase func(string)) Outcome {
	start := p.now()
	o := Outcome{Pin: pin}
	done := func(result string) Outcome {
		o.Result, o.Took = result, p.now().Sub(start)
		return o
	}
	ref := pin.Ref()
	phase(PhaseChecking)
	st, err := p.rt.ImageStatus(ctx, ref)
	if err != nil {
		o.Reason, o.Detail = ReasonRuntimeError, err.Error()
		return done(ResultFailed)
	}
	if st != nil {
		o.ImageID = st.ID
		p.pinGC(ctx, ref, st.Pinned)
		return done(ResultPresent)
	}

	phase(PhaseVerifying)
	r := p.judge.Judge(ctx, pin.Repo, pin.Digest)
	o.Verdict, o.Reason, o.Detail = r.Verdict, r.Reason, r.Detail
	switch r.Verdict {
	case verdict.Verified, verdict.Ignored:
	case verdict.Unverified, verdict.Untrusted:
		return done(ResultRejected)
	default:
		if o.Verdict == "" {
			o.Verdict = verdict.Pending
		}
		if o.Reason == "" {
			o.Reason = verdict.ReasonQueued
		}
		return done(ResultFailed)
	}

	unlock, err := p.digests.lock(ctx, pin.Digest)
	if err != nil {
		o.Reason, o.Detail = ReasonPullFailed, err.Error()
		return done(ResultFailed)
	}
	defer unlock()
	// Another attempt may have pulled the same reference while we waited.
	if st, err := p.rt.ImageStatus(ctx, ref); err == nil && st != nil {
		o.ImageID = st.ID
		p.pinGC(ctx, ref, st.Pinned)
		return done(ResultPresent)
	}
	phase(PhasePulling)
	pctx, cancel := context.WithTimeout(ctx, p.opts.PullTimeout)
	id, err := p.rt.PullImage(pctx, ref, p.auth(pin.Repo))
	cancel()
	if err != nil {
		o.Reason, o.Detail = ReasonPullFailed, err.Error()
		return done(ResultFailed)
	}
	o.ImageID = id
	p.pinGC(ctx, ref, false)
	return done(ResultPulled)
}

// pinGC labels the image name ref against kubelet's GC when PinGC is on. A
// failure is logged; the next recheck tries again.
func (p *Prefetcher) pinGC(ctx context.Context, ref string, pinned bool) {
	if !p.opts.PinGC || pinned {
		return
	}
	if err := p.rt.PinImage(ctx, ref); err != nil {
		p.log.Warn("could not pin the prefetched image against kubelet's image GC", "image", ref, "err", err)
	}
}

// auth returns the credentials for the registry host of repo (a normalized
// repository), never those of another host; nil when there are none.
func (p *Prefetcher) auth(repo string) *cri.Auth {
	if p.opts.Credentials == nil {
		return nil
	}
	host, _, _ := strings.Cut(repo, "/")
	ac, ok := p.opts.Credentials.Credentials(host)
	if !ok || (ac.Username == "" && ac.Password == "" && ac.IdentityToken == "" && ac.RegistryToken == "") {
		return nil
	}
	return &cri.Auth{Username: ac.Username, Password: ac.Password, IdentityToken: ac.IdentityToken, RegistryToken: ac.RegistryToken}
}

// keyLock is a mutex per key (digest): one pull of a digest at a time.
type keyLock struct {
	mu   sync.Mutex               // guards held
	held map[string]chan struct{} // closed on unlock
}

func (k *keyLock) lock(ctx context.Context, key string) (func(), error) {
	for {
		k.mu.Lock()
		ch, busy := k.held[key]
		if !busy {
			ch = make(chan struct{})
			k.held[key] = ch
			k.mu.Unlock()
			return func() {
				k.mu.Lock()
				delete(k.held, key)
				k.mu.Unlock()
				close(ch)
			}, nil
		}
		k.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for another pull of %s: %w", key, ctx.Err())
		}
	}
}
