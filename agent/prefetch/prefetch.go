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
	"context"
	"fmt"
	"log/slog"
	"math"
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

// retryBackoff is the backoff after failed attempts at one pin: RetryBase,
// doubling up to RetryMax, each wait plus up to 10% jitter.
func (p *Prefetcher) retryBackoff() wait.Backoff {
	return wait.Backoff{Duration: p.opts.RetryBase, Factor: 2, Jitter: 0.1, Steps: math.MaxInt32, Cap: p.opts.RetryMax}
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
