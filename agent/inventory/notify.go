package inventory

import (
	"slices"
	"sync"
)

// Change is what happened since a subscriber last received.
type Change struct {
	// Digests whose entry appeared, changed (tags, repos, size) or
	// disappeared, or whose running containers changed. Sorted.
	Digests []string
	// Containers is true when the set of running containers changed.
	Containers bool
	// Resync is true when a full relist happened (at start, after every
	// reconnect, and every resync interval).
	Resync bool
}

// merge folds b into a.
func (a Change) merge(b Change) Change {
	ds := append(slices.Clone(a.Digests), b.Digests...)
	slices.Sort(ds)
	return Change{Digests: slices.Compact(ds), Containers: a.Containers || b.Containers, Resync: a.Resync || b.Resync}
}

// subscribers is the set of change channels. mu guards set and serializes
// the sends, which makes notify the only sender of every channel.
type subscribers struct {
	mu  sync.Mutex
	set map[chan Change]struct{}
}

// Subscribe returns a channel of changes. The channel holds at most one
// Change and coalesces: while the consumer is busy, later changes are
// merged into the pending one, so a slow consumer sees the union of
// everything and the inventory never blocks on it. The channel is never
// closed; call Unsubscribe when done.
func (inv *Inventory) Subscribe() <-chan Change {
	ch := make(chan Change, 1)
	inv.subs.mu.Lock()
	defer inv.subs.mu.Unlock()
	if inv.subs.set == nil {
		inv.subs.set = map[chan Change]struct{}{}
	}
	inv.subs.set[ch] = struct{}{}
	return ch
}

// Unsubscribe stops delivery to a channel from Subscribe.
func (inv *Inventory) Unsubscribe(c <-chan Change) {
	inv.subs.mu.Lock()
	defer inv.subs.mu.Unlock()
	for ch := range inv.subs.set {
		if (<-chan Change)(ch) == c {
			delete(inv.subs.set, ch)
		}
	}
}

func (inv *Inventory) notify(digests []string, containers, resync bool) {
	if len(digests) == 0 && !containers && !resync {
		return
	}
	c := Change{Digests: digests, Containers: containers, Resync: resync}
	inv.subs.mu.Lock()
	defer inv.subs.mu.Unlock()
	for ch := range inv.subs.set {
		next := c.merge(Change{})
		select {
		case pending := <-ch: // the consumer has not taken it yet
			next = pending.merge(c)
		default:
		}
		// Never blocks: we are the only sender and the buffer is empty.
		ch <- next
	}
}
