// Package loop is the agent's node loop: it turns changes of the node's
// inventory and of the policy into verdicts for every image digest, detects
// drift of pinned tags, and publishes the result to metrics and the status API.
//
// Work is keyed by digest in a coalescing, bounded queue served by a fixed
// pool of workers. Verdicts the cache already holds cost no network; pending
// verdicts (registry trouble) are retried with capped, jittered backoff.
package loop

import (
	"context"
	"log/slog"
	"math"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/queue"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// Inventory is what the loop needs to know about the node's images.
type Inventory interface {
	// View returns every image sorted by digest; the result is shared and
	// never modified.
	View() []inventory.Image
	Digests() []string
	Get(digest string) (inventory.Image, bool)
}

// Judger decides the verdict of one digest in one repository.
type Judger interface {
	Judge(ctx context.Context, repo, digest string) verdict.Result
}

// Publisher receives the node's state after every change (metrics). The
// state is shared and must not be modified.
type Publisher interface {
	Publish(*nodestate.State)
	QueueDepth(int)
}

// Reporter is told about the node's state after every change, e.g. to send
// Kubernetes events on transitions. It must not block nor modify the state.
type Reporter interface {
	Report(*nodestate.State)
}

// Options tune the loop. Zero values take the defaults shown.
type Options struct {
	Workers       int           // 4
	QueueCapacity int           // 20000
	RetryBase     time.Duration // 2s: first retry of a pending verdict, doubling
	RetryMax      time.Duration // 5m: the cap (each retry adds up to 10% jitter)
	// VerifiedTTL and FailedTTL re-queue a digest when its verified or
	// unverified verdict expires (the cache TTLs); zero: only the relist does.
	VerifiedTTL time.Duration
	FailedTTL   time.Duration
	OnDropped   func()   // a digest was dropped from the full queue
	Reporter    Reporter // optional
	// PublishInterval bounds how often the state is rebuilt and published
	// while digests wait in the queue (a relist of thousands of digests);
	// as soon as the queue has no waiting digest the state is published at
	// once, so a single change is never delayed. Default 100ms.
	PublishInterval time.Duration
	// ReleaseAfter: when the queue has drained and at least this many
	// digests were judged since the last time (a full relist of a large
	// node), the memory the burst freed is returned to the operating
	// system at once (debug.FreeOSMemory) instead of staying in the
	// process's RSS. Default 1000; negative: never.
	ReleaseAfter int
	// release replaces debug.FreeOSMemory in tests.
	release func()
}

// Loop is created with New and started with Run.
type Loop struct {
	inv   Inventory
	judge Judger
	pub   Publisher
	log   *slog.Logger
	opts  Options
	q     *queue.Queue
	dirty chan struct{}
	state atomic.Pointer[nodestate.State]
	// stale is set when the published state may differ from the current
	// one (a verdict, the inventory or the pins changed); a wake-up of the
	// publisher without it only refreshes the queue depth.
	stale atomic.Bool
	// judged counts judgements since memory was last released, for
	// Options.ReleaseAfter.
	judged atomic.Int64

	mu sync.Mutex // guards results, retries and pins
	// results is the current verdict of every digest judged so far.
	results map[string]verdict.Result
	// retries is the backoff of each digest whose verdict is pending.
	retries map[string]*wait.Backoff
	pins    []pins.Pin
}

// New returns a loop; nothing runs until Run.
func New(inv Inventory, j Judger, pub Publisher, logger *slog.Logger, opts Options) *Loop {
	if opts.Workers <= 0 {
		opts.Workers = 4
	}
	if opts.QueueCapacity <= 0 {
		opts.QueueCapacity = 20000
	}
	if opts.RetryBase <= 0 {
		opts.RetryBase = 2 * time.Second
	}
	if opts.RetryMax <= 0 {
		opts.RetryMax = 5 * time.Minute
	}
	if opts.PublishInterval <= 0 {
		opts.PublishInterval = 100 * time.Millisecond
	}
	if opts.ReleaseAfter == 0 {
		opts.ReleaseAfter = 1000
	}
	if opts.release == nil {
		opts.release = debug.FreeOSMemory
	}
	l := &Loop{
		inv: inv, judge: j, pub: pub, log: logger, opts: opts,
		q:       queue.New(opts.QueueCapacity, opts.OnDropped),
		dirty:   make(chan struct{}, 1),
		results: map[string]verdict.Result{},
		retries: map[string]*wait.Backoff{},
	}
	l.state.Store(&nodestate.State{})
	return l
}

// Run serves the queue and publishes state until ctx is done. In-flight
// verifications are abandoned through ctx.
func (l *Loop) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	for range l.opts.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l.work(ctx)
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		l.publishLoop(ctx)
	}()
	<-ctx.Done()
	l.q.ShutDown()
	wg.Wait()
	return nil
}

// Changed queues the given digests for judgement (inventory events).
func (l *Loop) Changed(digests ...string) {
	for _, d := range digests {
		l.q.Add(d)
	}
	l.markStale()
}

// Resync queues every digest on the node and forgets digests that left it.
// Cached verdicts make this cheap; expired ones are verified again.
func (l *Loop) Resync() {
	ds := l.inv.Digests()
	present := make(map[string]bool, len(ds))
	for _, d := range ds {
		present[d] = true
	}
	l.mu.Lock()
	for d := range l.results {
		if !present[d] {
			delete(l.results, d)
			delete(l.retries, d)
		}
	}
	l.mu.Unlock()
	for _, d := range ds {
		l.q.Add(d)
	}
	l.markStale()
}

// Rejudge queues every digest judged so far (after a policy change) and
// restarts the backoff of pending ones.
func (l *Loop) Rejudge() {
	l.mu.Lock()
	again := make([]string, 0, len(l.results))
	for d := range l.results {
		again = append(again, d)
	}
	clear(l.retries)
	l.mu.Unlock()
	l.Changed(again...)
}

// SetPins replaces the pins used for drift detection.
func (l *Loop) SetPins(p []pins.Pin) {
	l.mu.Lock()
	l.pins = p
	l.mu.Unlock()
	l.markStale()
}

// State returns the last published node state (the status API's source).
// It is shared: callers must not modify it.
func (l *Loop) State() *nodestate.State { return l.state.Load() }

// markStale notes that the published state is out of date and wakes the
// publisher.
func (l *Loop) markStale() {
	l.stale.Store(true)
	l.markDirty()
}

// markDirty wakes the publisher.
func (l *Loop) markDirty() {
	select {
	case l.dirty <- struct{}{}:
	default:
	}
}

func (l *Loop) work(ctx context.Context) {
	for {
		d, ok := l.q.Get(ctx)
		if !ok {
			return
		}
		l.judgeDigest(ctx, d)
		l.judged.Add(1)
		l.q.Done(d)
	}
}

// judgeDigest judges one digest under every repository it is known by; the
// worst verdict wins, so an alias can never launder an image.
func (l *Loop) judgeDigest(ctx context.Context, d string) {
	img, ok := l.inv.Get(d)
	if !ok {
		l.mu.Lock()
		delete(l.results, d)
		delete(l.retries, d)
		l.mu.Unlock()
		l.markStale()
		return
	}
	repos := img.Repos
	var worst verdict.Result
	if len(repos) == 0 {
		worst = verdict.Result{Digest: d, Verdict: verdict.Untrusted, Reason: verdict.ReasonNoPolicy, VerifiedAt: time.Now(),
			Detail: "the image has no repository name to match a policy with"}
	}
	for i, repo := range repos {
		r := l.judge.Judge(ctx, repo, d)
		if i == 0 || verdict.Severity(r.Verdict) > verdict.Severity(worst.Verdict) {
			worst = r
		}
	}
	if ctx.Err() != nil {
		return // shutting down: keep the previous verdict
	}
	l.mu.Lock()
	prev, had := l.results[d]
	l.results[d] = worst
	var retry time.Duration
	if worst.Verdict == verdict.Pending {
		b := l.retries[d]
		if b == nil {
			b = &wait.Backoff{Duration: l.opts.RetryBase, Factor: 2, Jitter: 0.1, Steps: math.MaxInt32, Cap: l.opts.RetryMax}
			l.retries[d] = b
		}
		retry = b.Step()
	} else {
		delete(l.retries, d)
		retry = l.untilExpiry(worst)
	}
	l.mu.Unlock()
	switch {
	case had && prev.Verdict == worst.Verdict && prev.Reason == worst.Reason:
	case !had && worst.Source == verdict.SourceCache:
		// Read back from the cache (a restart): logged when it was computed.
		// At Info, a restart on a node of 10,000 images would spend more
		// time logging than judging.
		l.log.Debug("verdict", "digest", d, "repo", repos, "verdict", worst.Verdict, "reason", worst.Reason,
			"policy", worst.Policy, "source", worst.Source)
	default:
		l.log.Info("verdict", "digest", d, "repo", repos, "verdict", worst.Verdict, "reason", worst.Reason,
			"policy", worst.Policy, "source", worst.Source)
	}
	if retry > 0 {
		l.q.AddAfter(d, retry)
	}
	if !had || !samePublished(prev, worst) {
		l.markStale()
	} else {
		l.markDirty() // the queue depth changed
	}
}

// samePublished reports whether a and b show the same in the published
// state (the fields that metrics, status and report read).
func samePublished(a, b verdict.Result) bool {
	return a.Verdict == b.Verdict && a.Reason == b.Reason && a.Source == b.Source && a.Policy == b.Policy &&
		a.VerifiedAt.Equal(b.VerifiedAt) && slices.Equal(a.Signers, b.Signers)
}

// untilExpiry is how long until r's cached verdict expires, plus a second so
// that the judge sees it expired; 0 when it never expires.
func (l *Loop) untilExpiry(r verdict.Result) time.Duration {
	var ttl time.Duration
	switch r.Verdict {
	case verdict.Verified:
		ttl = l.opts.VerifiedTTL
	case verdict.Unverified:
		ttl = l.opts.FailedTTL
	}
	if ttl <= 0 || r.VerifiedAt.IsZero() {
		return 0
	}
	return max(time.Until(r.VerifiedAt.Add(ttl)), 0) + time.Second
}

// publishLoop publishes after every wake-up. While digests wait in the
// queue, publishes are at least PublishInterval apart: rebuilding the state
// of 10,000 images after each of 10,000 cache hits would cost more than the
// judging. A wake-up with nothing stale only refreshes the queue depth.
func (l *Loop) publishLoop(ctx context.Context) {
	var last time.Time
	timer := time.NewTimer(0)
	defer timer.Stop()
	<-timer.C
	for {
		select {
		case <-ctx.Done():
			return
		case <-l.dirty:
		}
		for l.q.Len() > 0 {
			wait := l.opts.PublishInterval - time.Since(last)
			if wait <= 0 {
				break
			}
			timer.Reset(wait)
			select {
			case <-ctx.Done():
				return
			case <-l.dirty:
				timer.Stop() // since Go 1.23 no stale tick is left in timer.C
				continue
			case <-timer.C:
			}
			break
		}
		if l.stale.Swap(false) {
			l.publish()
			last = time.Now()
		} else if l.pub != nil {
			l.pub.QueueDepth(l.q.Len())
		}
		if l.opts.ReleaseAfter > 0 && l.q.Len() == 0 && l.judged.Load() >= int64(l.opts.ReleaseAfter) {
			l.judged.Store(0)
			l.opts.release()
		}
	}
}

// publish recomputes the node's state from the inventory, the verdicts and
// the pins, and hands it to metrics, the status API and the reporter.
func (l *Loop) publish() {
	snap := l.inv.View()
	l.mu.Lock()
	results := make(map[string]verdict.Result, len(snap))
	for _, img := range snap {
		if r, ok := l.results[img.Digest]; ok {
			results[img.Digest] = r
		}
	}
	pinned := make(map[string]string, len(l.pins)) // repo:tag -> pinned digest
	for _, p := range l.pins {
		if p.Tag != "" {
			pinned[p.TagRef()] = p.Digest
		}
	}
	l.mu.Unlock()

	st := BuildState(snap, results, pinned)
	l.state.Store(st)
	if l.pub != nil {
		l.pub.Publish(st)
		l.pub.QueueDepth(l.q.Len())
	}
	if l.opts.Reporter != nil {
		l.opts.Reporter.Report(st)
	}
}
