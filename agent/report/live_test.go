package report

import (
	"path/filepath"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// The incident switch: turning quarantineTaint off by SetOptions (a config
// reload) lifts the taint at once; turning it on again puts it back.
func TestSetOptionsTaintOffLiftsTaint(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cs := fake.NewClientset(testNode())
		r, stop := start(t, cs, WithEvents(false), WithQuarantineTaint(true))
		defer stop()
		bad := []nodestate.Image{img('a', verdict.Unverified, 1)}
		report(r, bad...)
		if !hasTaint(getNode(t, cs).Spec.Taints) {
			t.Fatal("no taint while True")
		}
		r.SetOptions(WithQuarantineTaint(false))
		synctest.Wait()
		if hasTaint(getNode(t, cs).Spec.Taints) {
			t.Fatal("taint still on after quarantineTaint was turned off")
		}
		if c := condition(t, cs); c == nil || c.Status != corev1.ConditionTrue {
			t.Errorf("condition = %+v, want True (only the taint is switched off)", c)
		}
		report(r, bad...)
		if hasTaint(getNode(t, cs).Spec.Taints) {
			t.Fatal("taint back while off")
		}
		r.SetOptions(WithQuarantineTaint(true))
		synctest.Wait()
		if !hasTaint(getNode(t, cs).Spec.Taints) {
			t.Fatal("taint not back after quarantineTaint was turned on")
		}
	})
}

// Events and the condition follow SetOptions too.
func TestSetOptionsEventsAndCondition(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cs := fake.NewClientset(testNode())
		r, stop := start(t, cs, WithEvents(false), WithNodeCondition(false))
		defer stop()
		report(r, img('a', verdict.Unverified, 1))
		if n := len(storedEvents(t, cs)); n != 0 || condition(t, cs) != nil {
			t.Fatalf("off: %d events, condition %+v", n, condition(t, cs))
		}
		r.SetOptions(WithEvents(true), WithNodeCondition(true))
		report(r, img('a', verdict.Unverified, 1))
		if got := emitted(t, cs)["Node/"+nodeName+"/"+verdict.EventImageUnverified]; got != 1 {
			t.Errorf("%d ImageUnverified events on the node after events were turned on, want 1", got)
		}
		if c := condition(t, cs); c == nil || c.Status != corev1.ConditionTrue {
			t.Errorf("condition = %+v after it was turned on, want True", c)
		}
	})
}

func otherNode(name string, tainted bool) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "1"}}
	if tainted {
		n.Spec.Taints = []corev1.Taint{{Key: TaintKey, Value: TaintValue, Effect: TaintEffect}}
	}
	return n
}

// The guard holds the taint back while the limit is reached, says so in an
// Event and to the observer, and taints once room is made.
func TestGuard(t *testing.T) {
	tests := []struct {
		name string
		spec string
		held bool
	}{
		{"no guard", "", false},
		{"count reached", "1", true},
		{"count with room", "2", false},
		{"percentage reached (25% of 4 is 1)", "25%", true},
		{"percentage with room (50% of 4 is 2)", "50%", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				cs := fake.NewClientset(testNode(), otherNode("n2", true), otherNode("n3", false), otherNode("n4", false))
				var held atomic.Bool
				r, stop := start(t, cs, WithQuarantineTaint(true), WithMaxUnavailable(tt.spec),
					WithHoldObserver(func(h bool) { held.Store(h) }))
				defer stop()
				report(r, img('a', verdict.Unverified, 1))
				if on := hasTaint(getNode(t, cs).Spec.Taints); on == tt.held {
					t.Fatalf("taint on = %v, want %v", on, !tt.held)
				}
				if held.Load() != tt.held {
					t.Errorf("observer held = %v, want %v", held.Load(), tt.held)
				}
				if got := created(cs, ReasonQuarantineHeldBack); (got == 1) != tt.held || got > 1 {
					t.Errorf("%d QuarantineHeldBack events, want held=%v", got, tt.held)
				}
				if tt.spec == "" && count(cs, "list", "nodes", "") != 0 {
					t.Errorf("nodes listed without a guard (RBAC grows by list nodes only with the guard)")
				}
				if !tt.held {
					return
				}
				// Room is made: the next look (30 s later) taints.
				n2 := otherNode("n2", false)
				if err := cs.Tracker().Update(nodesGVR, n2, ""); err != nil {
					t.Fatal(err)
				}
				time.Sleep(holdRecheck)
				synctest.Wait()
				if !hasTaint(getNode(t, cs).Spec.Taints) {
					t.Fatal("not tainted after the other node's taint went")
				}
				if held.Load() {
					t.Error("observer still says held")
				}
				report(r, img('a', verdict.Unverified, 1))
				if got := created(cs, ReasonQuarantineHeldBack); got != 1 {
					t.Errorf("%d QuarantineHeldBack events, want 1", got)
				}
			})
		})
	}
}

// A restart with the state file sends no event again for problems already
// reported (same object, digest and problem), and still reports new ones.
func TestNoDuplicateEventsAfterRestart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cs := fake.NewClientset(testNode())
		state := filepath.Join(t.TempDir(), "reported.json")
		bad := img('a', verdict.Unverified, 1, "shop/api-0")
		r, stop := start(t, cs, WithStateFile(state))
		report(r, bad)
		stop()
		want := map[string]int{
			"Node/" + nodeName + "/" + verdict.EventImageUnverified: 1,
			"Pod/shop/api-0/" + verdict.EventImageUnverified:        1,
		}
		check := func(when string) {
			t.Helper()
			got := emitted(t, cs)
			for k, v := range want {
				if got[k] != v {
					t.Errorf("%s: %s emitted %d times, want %d (all: %v)", when, k, got[k], v, got)
				}
			}
		}
		check("first run")

		r, stop = start(t, cs, WithStateFile(state))
		report(r) // the first state after a start may list no image yet
		report(r, bad)
		check("after a restart")
		// A new pod running the image is still told, once.
		report(r, img('a', verdict.Unverified, 2, "shop/api-0", "shop/api-1"))
		want["Pod/shop/api-1/"+verdict.EventImageUnverified] = 1
		check("new pod")
		stop()

		// Without the file (memory only), a restart repeats the Warnings:
		// what the file prevents.
		r, stop = start(t, cs)
		report(r, bad)
		stop()
		if got := emitted(t, cs)["Node/"+nodeName+"/"+verdict.EventImageUnverified]; got != 2 {
			t.Errorf("without a state file: %d node events, want 2", got)
		}
	})
}

// created counts the events with reason the client sent (create or patch):
// in a bubble two events of one sync share a timestamp, so the recorder
// gives them one name and the fake tracker keeps only one.
func created(cs *fake.Clientset, reason string) int {
	n := 0
	for _, a := range cs.Actions() {
		if a.GetResource().Resource != "events" || a.GetVerb() != "create" {
			continue
		}
		if ev, ok := a.(k8stesting.CreateAction).GetObject().(*corev1.Event); ok && ev.Reason == reason {
			n++
		}
	}
	return n
}
