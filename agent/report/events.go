package report

import (
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// problem is what an event reports about a digest.
type problem string

const (
	problemUnverified problem = "unverified"
	problemUntrusted  problem = "untrusted"
	problemDrifted    problem = "drifted"
)

// reportedSet records, per digest and problem, the pods already told about it
// (the Node has been told when the entry exists).
type reportedSet map[string]map[problem]map[string]bool

// emitTransitions sends one Warning on the Node per digest entering a
// problem, and one per pod running it, the first time that pod is seen with
// the problem. A pending verdict is undecided: it neither enters nor leaves
// a verdict problem, so a re-check that fails for a while and then confirms
// the old verdict emits nothing new. A digest that leaves the list forgets
// everything.
func (w *worker) emitTransitions(imgs []nodestate.Image) {
	next := make(reportedSet, len(w.reported))
	for i := range imgs {
		im := &imgs[i]
		if _, dup := next[im.Digest]; dup {
			continue
		}
		prev := w.reported[im.Digest]
		cur := map[problem]map[string]bool{}
		var ps []problem
		switch im.Result.Verdict {
		case verdict.Unverified:
			ps = append(ps, problemUnverified)
		case verdict.Untrusted:
			ps = append(ps, problemUntrusted)
		case verdict.Pending:
			for p, pods := range prev {
				if p != problemDrifted {
					cur[p] = pods
				}
			}
		}
		if im.Drifted() {
			ps = append(ps, problemDrifted)
		}
		for _, p := range ps {
			pods, had := prev[p]
			if had && samePods(pods, im.Pods) {
				cur[p] = pods // the steady state: nothing to send, nothing to allocate
				continue
			}
			reason, msg := problemEvent(im, p)
			if !had {
				w.event(w.nodeRef(), corev1.EventTypeWarning, reason, msg)
			}
			told := make(map[string]bool, len(im.Pods))
			for _, pod := range im.Pods {
				if !pods[pod] {
					if ref, ok := podRef(pod); ok {
						w.event(ref, corev1.EventTypeWarning, reason, msg)
					}
				}
				told[pod] = true
			}
			cur[p] = told
		}
		if len(cur) > 0 {
			if sameProblems(prev, cur) {
				cur = prev
			}
			next[im.Digest] = cur
		}
	}
	// What the last run reported is kept until its digest shows up in a
	// list: the first states after a start may not list every image yet.
	// A digest that never shows up (removed meanwhile) is dropped after
	// keepUnseen.
	if len(w.unseen) > 0 {
		expired := w.r.opts.clock.Since(w.loadedAt) > keepUnseen
		for d := range w.unseen {
			if _, ok := next[d]; ok || expired || listed(imgs, d) {
				delete(w.unseen, d)
				continue
			}
			next[d] = w.reported[d]
		}
	}
	w.reported = next
}

// keepUnseen is how long a reported digest loaded from the state file is
// kept while no list names it.
const keepUnseen = 10 * time.Minute

func listed(imgs []nodestate.Image, digest string) bool {
	for i := range imgs {
		if imgs[i].Digest == digest {
			return true
		}
	}
	return false
}

func samePods(told map[string]bool, pods []string) bool {
	if len(told) != len(pods) {
		return false
	}
	for _, p := range pods {
		if !told[p] {
			return false
		}
	}
	return true
}

// sameProblems reports whether b holds exactly a's problems with the same
// pod sets (by identity: unchanged sets are reused).
func sameProblems(a, b map[problem]map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for p, pods := range b {
		old, ok := a[p]
		if !ok || len(old) != len(pods) {
			return false
		}
		for pod := range pods {
			if !old[pod] {
				return false
			}
		}
	}
	return true
}

// problemEvent returns the reason and message of a Warning about im.
func problemEvent(im *nodestate.Image, p problem) (reason, msg string) {
	short := status.ShortDigest(im.Digest)
	switch p {
	case problemDrifted:
		return verdict.EventImageDrifted, fmt.Sprintf("image %s (%s) drifted: the node has %s but the pin is %s",
			im.Name, short, im.Digest, im.PinnedDigest())
	case problemUntrusted:
		reason = verdict.EventImageUntrusted
	default:
		reason = verdict.EventImageUnverified
	}
	msg = fmt.Sprintf("image %s (%s) is %s: %s", im.Name, short, im.Result.Verdict, orUnknown(im.Result.Reason))
	if im.Result.Policy != "" {
		msg += fmt.Sprintf(" (policy %s)", im.Result.Policy)
	}
	return reason, msg
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// event hands one event to the broadcaster (which never blocks). At most
// maxEventsPerSync go out per wake; the rest are counted and logged once by
// sync (the broadcaster would drop them anyway: its queue holds 1000 and its
// spam filter lets 25 per object through, then one per 5 minutes).
func (w *worker) event(ref *corev1.ObjectReference, eventtype, reason, msg string) {
	if w.recorder == nil || !w.o.events {
		return
	}
	if w.sent >= maxEventsPerSync {
		w.suppressed++
		return
	}
	w.sent++
	w.recorder.Event(ref, eventtype, reason, msg)
}

// nodeRef is the Node as events name it. Until the node's UID is known it
// uses the node name, as the kubelet does (kubectl describe finds both).
func (w *worker) nodeRef() *corev1.ObjectReference {
	uid := w.nodeUID
	if uid == "" {
		uid = types.UID(w.r.node)
	}
	return &corev1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: w.r.node, UID: uid}
}

// podRef parses "namespace/name". Pods carry no UID: getting one would need
// RBAC on pods that pinwarden does not have.
func podRef(pod string) (*corev1.ObjectReference, bool) {
	ns, name, ok := strings.Cut(pod, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return nil, false
	}
	return &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: ns, Name: name}, true
}
