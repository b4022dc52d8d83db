package agent

import (
	"fmt"
	"sync"
	"time"
)

// runtimeDownGrace is how long the runtime may be unreachable before
// /readyz fails. A containerd restart takes seconds and the inventory
// reconnects with a backoff capped at 30 s, so a minute covers a restart
// while a lasting outage still shows as NotReady.
const runtimeDownGrace = time.Minute

// runtimeState is what the probes need from the inventory.
type runtimeState interface {
	Ready() bool     // the first full list has completed
	RuntimeUp() bool // the runtime connection is healthy now
}

// readiness decides /readyz: ready after the first full list, and not while
// the runtime has been unreachable for longer than grace. Liveness (/healthz)
// never looks at the runtime: a containerd outage must not restart the agent
// on every node.
type readiness struct {
	rt    runtimeState
	grace time.Duration

	// mu guards downSince: when a probe first saw the runtime down (zero
	// while it is up). Probes run every few seconds, so this trails the
	// real outage by at most one probe period.
	mu        sync.Mutex
	downSince time.Time
}

// check returns nil when ready, or why not.
func (r *readiness) check(now time.Time) error {
	if !r.rt.Ready() {
		return fmt.Errorf("waiting for the first full list of the runtime")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.rt.RuntimeUp() {
		r.downSince = time.Time{}
		return nil
	}
	if r.downSince.IsZero() {
		r.downSince = now
	}
	if down := now.Sub(r.downSince); down > r.grace {
		return fmt.Errorf("container runtime unreachable for %s (grace %s)", down.Round(time.Second), r.grace)
	}
	return nil
}
