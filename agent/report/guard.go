package report

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pinwarden/pinwarden/agent/config"
)

// ReasonQuarantineHeldBack is the Warning event on the Node when the
// blast-radius guard keeps the quarantine taint off.
const ReasonQuarantineHeldBack = "QuarantineHeldBack"

// holdRecheck is how often a held-back node looks at the other nodes again.
const holdRecheck = 30 * time.Second

// heldBackError: the guard did not let this node taint itself.
type heldBackError struct {
	tainted, total, limit int
	spec                  string
}

func (e *heldBackError) Error() string {
	return fmt.Sprintf("quarantine held back: %d of %d nodes already carry %s, the limit is %d (kubernetes.quarantineMaxUnavailable %q)",
		e.tainted, e.total, TaintKey, e.limit, e.spec)
}

// guard lists the nodes and returns a *heldBackError when this node tainting
// itself would exceed kubernetes.quarantineMaxUnavailable, nil when it may
// (or there is no guard). It needs list on nodes.
//
// The guard is racy by nature: nodes decide concurrently, each from its own
// list, so k nodes turning bad within one list-and-patch round trip can all
// pass a limit that leaves room for one. The overshoot is bounded by the
// nodes deciding in the same moment; docs/kubernetes.md says so.
func (w *worker) guard(ctx context.Context) error {
	spec := w.o.maxUnavailable
	if spec == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	nodes, err := w.r.client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("quarantine guard: list nodes: %w", err)
	}
	tainted := 0
	for i := range nodes.Items {
		if nodes.Items[i].Name != w.r.node && hasTaint(nodes.Items[i].Spec.Taints) {
			tainted++
		}
	}
	limit, ok := config.MaxTainted(spec, len(nodes.Items))
	if !ok || tainted < limit {
		return nil
	}
	return &heldBackError{tainted: tainted, total: len(nodes.Items), limit: limit, spec: spec}
}

// setHeld records whether the guard holds the taint back; entering the hold
// sends a Warning on the Node and tells the observer, leaving it tells the
// observer.
func (w *worker) setHeld(held bool, msg string) {
	if held == w.held {
		return
	}
	w.held = held
	if held {
		w.r.log.Warn("quarantine taint held back by the guard", "node", w.r.node, "reason", msg)
		w.event(w.nodeRef(), corev1.EventTypeWarning, ReasonQuarantineHeldBack, msg)
	} else {
		w.heldRetryAt = time.Time{}
	}
	if w.r.opts.onHold != nil {
		w.r.opts.onHold(held)
	}
}
