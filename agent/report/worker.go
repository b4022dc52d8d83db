package report

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/record"

	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// cond is the part of the node condition that, when it changes, is written
// at once (timestamps only ride along).
type cond struct {
	status          corev1.ConditionStatus
	reason, message string
}

// worker is the state of one Run. Only Run's goroutine touches it.
type worker struct {
	r        *Reporter
	recorder record.EventRecorder // nil: no events (tests)
	o        liveOptions          // the options of the current sync
	reported reportedSet
	saved    []byte // reported as last written to the state file
	// unseen are digests loaded from the state file that no list has named
	// yet; loadedAt is when they were loaded.
	unseen   map[string]bool
	loadedAt time.Time
	// sent and suppressed count the events of the current sync.
	sent, suppressed int

	// The node, fetched once: its UID for events, and the condition and
	// taint it carried before this Run, so a restart neither re-stamps
	// lastTransitionTime nor drops the quarantine.
	nodeKnown bool
	nodeUID   types.UID
	getRetry  retrier

	desired      *cond     // what the condition should be; nil until known
	desiredSince time.Time // its lastTransitionTime
	written      *cond     // what the node carries as far as we know
	heartbeatAt  time.Time // lastHeartbeatTime of written
	condRetry    retrier

	taintOn        *bool // whether the node carries the taint, nil: unknown
	taintCheckedAt time.Time
	taintRetry     retrier
	held           bool      // the guard holds the taint back
	heldRetryAt    time.Time // when the guard looks again
}

func newWorker(r *Reporter) *worker {
	w := &worker{r: r, reported: reportedSet{}, unseen: map[string]bool{}}
	w.loadReported()
	return w
}

// enabled: something to report, or pinwarden's taint (maybe) left to remove.
func (w *worker) enabled() bool {
	return w.o.events || w.o.condition || w.o.taint || w.taintOn == nil || *w.taintOn
}

// sync does everything that is due and returns when it wants to be woken
// again even without a Report (zero: only by a Report or Event).
func (w *worker) sync(ctx context.Context) time.Time {
	w.o = w.r.liveOptions()
	if !w.enabled() {
		w.r.take()
		return time.Time{}
	}
	now := w.r.opts.clock.Now()
	imgs, have, evs := w.r.take()
	if !w.nodeKnown && !w.getRetry.waiting(now) {
		w.fetchNode(ctx, now)
	}
	for _, e := range evs {
		w.event(w.nodeRef(), e.eventtype, e.reason, e.message)
	}
	if have && w.recorder != nil && w.o.events {
		w.emitTransitions(imgs)
		w.saveReported()
	}
	if w.suppressed > 0 {
		w.r.log.Warn("too many events at once; some were not sent", "node", w.r.node,
			"sent", w.sent, "suppressed", w.suppressed)
	}
	w.sent, w.suppressed = 0, 0
	if !w.nodeKnown {
		return w.getRetry.at
	}
	if !have {
		return time.Time{}
	}
	if w.o.condition || w.o.taint {
		w.decide(imgs, now)
	}
	if w.o.condition {
		w.syncCondition(ctx, now)
	}
	switch {
	case w.o.taint:
		w.syncTaint(ctx, now, w.desired.status == corev1.ConditionTrue)
	case w.taintOn == nil || *w.taintOn:
		// quarantineTaint off (maybe just now, by a reload): lift ours.
		w.syncTaint(ctx, now, false)
	}
	if !w.o.taint || w.desired.status != corev1.ConditionTrue {
		w.setHeld(false, "")
	}
	return w.nextDeadline()
}

func (w *worker) fetchNode(ctx context.Context, now time.Time) {
	node, err := w.getNode(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return // shutting down
		}
		w.r.log.Warn("cannot get the node; retrying", "node", w.r.node, "retryIn", w.getRetry.failed(now), "err", err)
		return
	}
	w.getRetry.succeeded()
	w.nodeKnown, w.nodeUID = true, node.UID
	for _, c := range node.Status.Conditions {
		if c.Type != ConditionType || !w.o.condition {
			continue
		}
		w.desired = &cond{status: c.Status, reason: c.Reason, message: c.Message}
		w.written = w.desired
		w.desiredSince, w.heartbeatAt = c.LastTransitionTime.Time, c.LastHeartbeatTime.Time
	}
	on := hasTaint(node.Spec.Taints)
	w.taintOn, w.taintCheckedAt = &on, now
	if w.o.taint {
		if on && w.desired == nil {
			// condition off: remember the quarantine for the hold rule in decide
			w.desired = &cond{status: corev1.ConditionTrue}
		}
	}
}

func (w *worker) getNode(ctx context.Context) (*corev1.Node, error) {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	node, err := w.r.client.CoreV1().Nodes().Get(ctx, w.r.node, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get node %s: %w", w.r.node, err)
	}
	return node, nil
}

// decide computes the desired condition. It never goes from True to False
// while a running image is still pending: an undecided image must not lift
// the quarantine (after a restart every verdict starts pending).
func (w *worker) decide(imgs []nodestate.Image, now time.Time) {
	c, pendingRunning := desiredCondition(imgs)
	if c.status == corev1.ConditionFalse && pendingRunning && w.desired != nil && w.desired.status == corev1.ConditionTrue {
		return
	}
	if w.desired == nil || w.desired.status != c.status || w.desiredSince.IsZero() {
		w.desiredSince = now
	}
	w.desired = &c
}

// desiredCondition derives the UntrustedImage condition from the images, and
// whether any running image is still pending.
func desiredCondition(imgs []nodestate.Image) (c cond, pendingRunning bool) {
	type bad struct {
		name, digest, what string
		untrusted          bool
	}
	var bads []bad
	anyUntrusted := false
	for i := range imgs {
		im := &imgs[i]
		if im.Running <= 0 {
			continue
		}
		if im.Result.Verdict == verdict.Pending {
			pendingRunning = true
		}
		var what []string
		u := im.Result.Verdict == verdict.Unverified || im.Result.Verdict == verdict.Untrusted
		if u {
			what = append(what, string(im.Result.Verdict)+"/"+orUnknown(im.Result.Reason))
		}
		if im.Drifted() {
			what = append(what, "drifted")
		}
		if len(what) == 0 {
			continue
		}
		anyUntrusted = anyUntrusted || u
		bads = append(bads, bad{im.Name, im.Digest, strings.Join(what, ","), u})
	}
	if len(bads) == 0 {
		return cond{corev1.ConditionFalse, ReasonImagesTrusted, conditionMessageTrusted}, pendingRunning
	}
	sort.Slice(bads, func(i, j int) bool {
		a, b := bads[i], bads[j]
		if a.untrusted != b.untrusted {
			return a.untrusted
		}
		if a.name != b.name {
			return a.name < b.name
		}
		return a.digest < b.digest
	})
	var sb strings.Builder
	if len(bads) == 1 {
		sb.WriteString("1 running image fails policy: ")
	} else {
		fmt.Fprintf(&sb, "%d running images fail policy: ", len(bads))
	}
	for i, b := range bads[:min(len(bads), maxConditionImages)] {
		if i > 0 {
			sb.WriteString(", ")
		}
		fmt.Fprintf(&sb, "%s (%s %s)", b.name, status.ShortDigest(b.digest), b.what)
	}
	if n := len(bads) - maxConditionImages; n > 0 {
		fmt.Fprintf(&sb, " and %d more", n)
	}
	reason := ReasonDriftedImageRunning
	if anyUntrusted {
		reason = ReasonUntrustedImageRunning
	}
	return cond{corev1.ConditionTrue, reason, sb.String()}, pendingRunning
}

// syncCondition writes the desired condition when it differs from the
// node's, or when the heartbeat is due; after a failure it waits out the
// backoff, keeping the desired state.
func (w *worker) syncCondition(ctx context.Context, now time.Time) {
	d := *w.desired
	changed := w.written == nil || *w.written != d
	if !changed && now.Before(w.heartbeatAt.Add(w.r.opts.heartbeat)) {
		return
	}
	if w.condRetry.waiting(now) {
		return
	}
	if err := w.patchCondition(ctx, d, now); err != nil {
		if ctx.Err() != nil {
			return // shutting down
		}
		w.r.log.Warn("cannot write the node condition; retrying", "node", w.r.node, "condition", ConditionType,
			"status", d.status, "reason", d.reason, "retryIn", w.condRetry.failed(now), "err", err)
		return
	}
	if changed {
		w.r.log.Info("node condition", "node", w.r.node, "condition", ConditionType, "status", d.status,
			"reason", d.reason, "message", d.message)
	}
	w.condRetry.succeeded()
	w.written, w.heartbeatAt = &d, now
}

func (w *worker) patchCondition(ctx context.Context, d cond, now time.Time) error {
	c := corev1.NodeCondition{
		Type: ConditionType, Status: d.status, Reason: d.reason, Message: d.message,
		LastHeartbeatTime:  metav1.NewTime(now),
		LastTransitionTime: metav1.NewTime(w.desiredSince),
	}
	body, err := json.Marshal(map[string]any{"status": map[string]any{"conditions": []corev1.NodeCondition{c}}})
	if err != nil {
		return fmt.Errorf("encode condition patch: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	if _, err := w.r.client.CoreV1().Nodes().PatchStatus(ctx, w.r.node, body); err != nil {
		return fmt.Errorf("patch status of node %s: %w", w.r.node, err)
	}
	return nil
}

// syncTaint puts the quarantine taint on the node or takes it off when that
// differs from what the node is known to carry, and re-checks the node every
// heartbeat (someone may have removed it).
func (w *worker) syncTaint(ctx context.Context, now time.Time, want bool) {
	if w.taintOn != nil && *w.taintOn == want && now.Before(w.taintCheckedAt.Add(w.r.opts.heartbeat)) {
		return
	}
	if w.taintRetry.waiting(now) {
		return
	}
	if want && w.held && now.Before(w.heldRetryAt) {
		return
	}
	changed, err := w.reconcileTaint(ctx, want)
	if held := (*heldBackError)(nil); errors.As(err, &held) {
		// Not a failure: re-check soon, the other nodes may recover.
		w.setHeld(true, held.Error())
		off := false
		w.taintRetry.succeeded()
		w.taintOn, w.taintCheckedAt, w.heldRetryAt = &off, now, now.Add(holdRecheck)
		return
	}
	if err != nil {
		if ctx.Err() != nil {
			return // shutting down
		}
		w.r.log.Warn("cannot update the quarantine taint; retrying", "node", w.r.node, "taint", TaintKey,
			"want", want, "retryIn", w.taintRetry.failed(now), "err", err)
		return
	}
	if changed {
		w.r.log.Info("quarantine taint", "node", w.r.node, "taint", TaintKey+"="+TaintValue+":"+string(TaintEffect), "on", want)
	}
	w.taintRetry.succeeded()
	w.taintOn, w.taintCheckedAt = &want, now
	if want {
		w.setHeld(false, "")
	}
}

// reconcileTaint reads the node and, when needed, patches spec.taints with
// the node's other taints untouched. The patch carries the resourceVersion
// it was computed from, so a concurrent change of the taints makes it fail
// with a conflict instead of being overwritten; then it reads again.
func (w *worker) reconcileTaint(ctx context.Context, want bool) (changed bool, err error) {
	for attempt := 1; ; attempt++ {
		node, err := w.getNode(ctx)
		if err != nil {
			return false, err
		}
		taints, changed := withTaint(node.Spec.Taints, want)
		if !changed {
			return false, nil
		}
		if want && !hasTaint(node.Spec.Taints) {
			if err := w.guard(ctx); err != nil {
				return false, err
			}
		}
		meta := map[string]any{}
		if node.ResourceVersion != "" {
			meta["resourceVersion"] = node.ResourceVersion
		}
		body, err := json.Marshal(map[string]any{"metadata": meta, "spec": map[string]any{"taints": taints}})
		if err != nil {
			return false, fmt.Errorf("encode taint patch: %w", err)
		}
		pctx, cancel := context.WithTimeout(ctx, apiTimeout)
		_, err = w.r.client.CoreV1().Nodes().Patch(pctx, w.r.node, types.MergePatchType, body, metav1.PatchOptions{})
		cancel()
		if err == nil {
			return true, nil
		}
		if !apierrors.IsConflict(err) || attempt >= maxTaintConflictRetries {
			return false, fmt.Errorf("patch taints of node %s (attempt %d): %w", w.r.node, attempt, err)
		}
	}
}

func isOurs(t corev1.Taint) bool { return t.Key == TaintKey && t.Effect == TaintEffect }

func hasTaint(taints []corev1.Taint) bool {
	for _, t := range taints {
		if isOurs(t) && t.Value == TaintValue {
			return true
		}
	}
	return false
}

// withTaint returns taints with the quarantine taint present (want) or
// absent, every other taint kept in order; nil when none is left (the merge
// patch then deletes the field).
func withTaint(taints []corev1.Taint, want bool) (out []corev1.Taint, changed bool) {
	found := false
	for _, t := range taints {
		if isOurs(t) {
			if !want || found {
				changed = true
				continue
			}
			found = true
			if t.Value != TaintValue {
				t.Value, changed = TaintValue, true
			}
		}
		out = append(out, t)
	}
	if want && !found {
		out = append(out, corev1.Taint{Key: TaintKey, Value: TaintValue, Effect: TaintEffect})
		changed = true
	}
	return out, changed
}

// nextDeadline is the earliest heartbeat, re-check or retry that is due.
func (w *worker) nextDeadline() time.Time {
	var next time.Time
	at := func(t time.Time) {
		if !t.IsZero() && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	if w.o.condition {
		if w.condRetry.fails > 0 {
			at(w.condRetry.at)
		} else if w.written != nil {
			at(w.heartbeatAt.Add(w.r.opts.heartbeat))
		}
	}
	switch {
	case w.taintRetry.fails > 0 && (w.o.taint || w.taintOn == nil || *w.taintOn):
		at(w.taintRetry.at)
	case w.o.taint && w.held:
		at(w.heldRetryAt)
	case w.o.taint && w.taintOn != nil:
		at(w.taintCheckedAt.Add(w.r.opts.heartbeat))
	}
	return next
}

// retrier holds the consecutive failures of one kind of API write and when
// to try again: retryBase, doubling up to retryMax, each wait plus up to 10%
// jitter so that a fleet does not retry in step after an API server outage.
type retrier struct {
	fails   int
	at      time.Time // the next attempt, after a failure
	backoff wait.Backoff
}

// failed records a failure at now and returns how long until the next attempt.
func (r *retrier) failed(now time.Time) time.Duration {
	if r.fails == 0 {
		r.backoff = wait.Backoff{Duration: retryBase, Factor: 2, Jitter: 0.1, Steps: math.MaxInt32, Cap: retryMax}
	}
	r.fails++
	d := r.backoff.Step()
	r.at = now.Add(d)
	return d
}

// succeeded ends a run of failures: the next failure waits retryBase again.
func (r *retrier) succeeded() { r.fails = 0 }

// waiting reports whether a failure's wait is not over at now.
func (r *retrier) waiting(now time.Time) bool { return r.fails > 0 && now.Before(r.at) }
