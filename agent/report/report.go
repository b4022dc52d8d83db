// Package report tells the Kubernetes API server about the node's state
// (agent/nodestate): Warning events on the Node (and on the Pods running the
// image) when a digest turns unverified, untrusted or drifted, the node
// condition UntrustedImage, and, opt-in, the quarantine taint
// pinwarden.dev/untrusted-image=true:NoSchedule while that condition is True.
//
// Report only stores the latest node state and wakes one worker (Run), so the
// node loop is never blocked by the API server. The worker patches the
// condition only when its status, reason or message change, plus a heartbeat,
// and retries failed writes with capped backoff without losing the desired
// state. It uses no verbs beyond the RBAC the CONTRACT grants: get/patch
// nodes, patch nodes/status, create/patch events.
package report

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/nodestate"
)

// Component is the event source and the reporting controller.
const Component = "pinwarden"

// The node condition and its reasons.
const (
	ConditionType               = corev1.NodeConditionType("UntrustedImage")
	ReasonUntrustedImageRunning = "UntrustedImageRunning"
	ReasonDriftedImageRunning   = "DriftedImageRunning"
	ReasonImagesTrusted         = "ImagesTrusted"
)

const (
	maxConditionImages      = 5
	defaultHeartbeat        = 5 * time.Minute
	retryBase, retryMax     = time.Second, time.Minute
	apiTimeout              = 30 * time.Second
	maxQueuedEvents         = 1000
	maxEventsPerSync        = 200
	maxMessageLen           = 1024 // events.k8s.io/v1 caps a note at 1 kB
	maxTaintConflictRetries = 5
	conditionMessageTrusted = "no running container uses an unverified, untrusted or drifted image"
)

// The quarantine taint.
const (
	TaintKey    = "pinwarden.dev/untrusted-image"
	TaintValue  = "true"
	TaintEffect = corev1.TaintEffectNoSchedule
)

// Option tunes a Reporter.
type Option func(*options)

type options struct {
	live      liveOptions // what SetOptions can change
	clock     clock.Clock
	heartbeat time.Duration
	stateFile string
	onHold    func(held bool)
}

// liveOptions are the kubernetes.* settings that change without a restart.
type liveOptions struct {
	events, condition, taint bool
	maxUnavailable           string // kubernetes.quarantineMaxUnavailable, "" no guard
}

// WithEvents turns events on or off (kubernetes.events; default on).
func WithEvents(on bool) Option { return func(o *options) { o.live.events = on } }

// WithNodeCondition turns the UntrustedImage condition on or off
// (kubernetes.nodeCondition; default on).
func WithNodeCondition(on bool) Option { return func(o *options) { o.live.condition = on } }

// WithQuarantineTaint turns the quarantine taint on or off
// (kubernetes.quarantineTaint; default off). Turned off while the node
// carries pinwarden's taint, the taint is removed: the incident switch for a
// quarantine caused by a bad policy.
func WithQuarantineTaint(on bool) Option { return func(o *options) { o.live.taint = on } }

// WithMaxUnavailable sets the blast-radius guard
// (kubernetes.quarantineMaxUnavailable, a valid count or percentage; "" no
// guard): before it taints the node, the reporter lists the nodes and holds
// back while that many already carry the taint.
func WithMaxUnavailable(spec string) Option { return func(o *options) { o.live.maxUnavailable = spec } }

// WithStateFile keeps the set of problems already reported in path, so a
// restart (a DaemonSet rollout) sends no event again. Empty: memory only.
func WithStateFile(path string) Option { return func(o *options) { o.stateFile = path } }

// WithHoldObserver is called with true when the guard starts holding the
// taint back, and false when it stops (metrics).
func WithHoldObserver(f func(held bool)) Option { return func(o *options) { o.onHold = f } }

// WithClock replaces the real clock (tests).
func WithClock(c clock.Clock) Option { return func(o *options) { o.clock = c } }

// WithHeartbeat sets how often the condition is re-written although
// unchanged, and the taint re-checked (default 5m).
func WithHeartbeat(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.heartbeat = d
		}
	}
}

// FromConfig returns the options of the config's kubernetes section that
// SetOptions can change live.
func FromConfig(k config.Kubernetes) []Option {
	return []Option{WithEvents(k.Events), WithNodeCondition(k.NodeCondition), WithQuarantineTaint(k.QuarantineTaint),
		WithMaxUnavailable(k.QuarantineMaxUnavailable)}
}

// Reporter reports the node's images to the API server. Create it with New,
// feed it with Report and Event from any goroutine, and run its worker with Run.
type Reporter struct {
	client kubernetes.Interface
	node   string
	log    *slog.Logger
	opts   options
	wake   chan struct{} // capacity 1: wakes coalesce
	active atomic.Bool   // Run is running

	mu sync.Mutex // guards latest, have, queued and opts.live
	// latest is the last state given to Report; nobody modifies it.
	latest *nodestate.State
	have   bool
	// queued are events from Event waiting for the worker, at most maxQueuedEvents.
	queued []genericEvent
}

type genericEvent struct{ eventtype, reason, message string }

// New returns a Reporter for the node nodeName; nothing runs until Run.
func New(client kubernetes.Interface, nodeName string, logger *slog.Logger, opts ...Option) *Reporter {
	o := options{live: liveOptions{events: true, condition: true}, clock: clock.RealClock{}, heartbeat: defaultHeartbeat}
	for _, opt := range opts {
		opt(&o)
	}
	if o.clock == nil {
		o.clock = clock.RealClock{}
	}
	return &Reporter{client: client, node: nodeName, log: logger, opts: o, wake: make(chan struct{}, 1)}
}

// SetOptions applies the live options among opts (events, node condition,
// quarantine taint, guard; others are ignored) and wakes the worker, which
// acts on them at once: turning the taint off removes pinwarden's taint.
func (r *Reporter) SetOptions(opts ...Option) {
	r.mu.Lock()
	o := r.opts
	for _, opt := range opts {
		opt(&o)
	}
	r.opts.live = o.live
	r.mu.Unlock()
	r.poke()
}

func (r *Reporter) liveOptions() liveOptions {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.opts.live
}

// Report stores st as the node's current state and wakes the worker. It
// never blocks; a burst of calls is handled once, with the last state. The
// caller must not modify st afterwards.
func (r *Reporter) Report(st *nodestate.State) {
	r.mu.Lock()
	r.latest, r.have = st, true
	r.mu.Unlock()
	r.poke()
}

// Event sends an event of type eventtype (corev1.EventTypeNormal or
// EventTypeWarning) about the node, e.g. ImagePrefetchFailed, ImagePrefetched
// or ConfigInvalid. It never blocks; events wait for the worker in a bounded
// queue (the oldest is dropped when it is full). The message must not carry
// credentials or URLs with secrets.
func (r *Reporter) Event(eventtype, reason, message string) {
	if !r.liveOptions().events {
		return
	}
	if len(message) > maxMessageLen {
		message = strings.ToValidUTF8(message[:maxMessageLen-3], "") + "..."
	}
	r.mu.Lock()
	if len(r.queued) >= maxQueuedEvents {
		r.queued = r.queued[1:]
	}
	r.queued = append(r.queued, genericEvent{eventtype, reason, message})
	r.mu.Unlock()
	r.poke()
}

func (r *Reporter) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

func (r *Reporter) take() (imgs []nodestate.Image, have bool, evs []genericEvent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	evs, r.queued = r.queued, nil
	if r.latest != nil {
		imgs = r.latest.Images
	}
	return imgs, r.have, evs
}

// errRunning means Run was called while another Run was active.
var errRunning = errors.New("report: Run is already running")

// Run is the worker: it sends events and writes the condition and the taint
// until ctx is done, then shuts the event broadcaster down and returns nil.
// API errors are logged and retried; they never end Run.
func (r *Reporter) Run(ctx context.Context) error {
	if !r.active.CompareAndSwap(false, true) {
		return errRunning
	}
	defer r.active.Store(false)

	w := newWorker(r)
	// Events may be turned on live: the broadcaster always runs (it costs
	// nothing while no event is sent).
	klogger := logr.FromSlogHandler(r.log.Handler())
	b := record.NewBroadcaster(record.WithContext(klog.NewContext(ctx, klogger)))
	defer b.Shutdown()
	b.StartRecordingToSink(retryingSink{&typedcorev1.EventSinkImpl{Interface: r.client.CoreV1().Events("")}})
	w.recorder = b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: Component, Host: r.node}).WithLogger(klogger)
	for {
		next := w.sync(ctx)
		var timer clock.Timer
		var fire <-chan time.Time
		if !next.IsZero() {
			timer = r.opts.clock.NewTimer(max(next.Sub(r.opts.clock.Now()), time.Millisecond))
			fire = timer.C()
		}
		select {
		case <-ctx.Done():
			if timer != nil {
				timer.Stop()
			}
			return nil
		case <-r.wake:
		case <-fire:
		}
		if timer != nil {
			timer.Stop()
		}
	}
}
