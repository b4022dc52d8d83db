package report

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"slices"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	testclock "k8s.io/utils/clock/testing"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

func TestConditionPatchedOnlyOnChangeAndHeartbeat(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		clk := testclock.NewFakeClock(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
		cs := fake.NewClientset(testNode())
		r, stop := start(t, cs, WithEvents(false), WithClock(clk), WithHeartbeat(5*time.Minute))
		defer stop()
		patches := func() int { return count(cs, "patch", "nodes", "status") }

		bad := []nodestate.Image{img('a', verdict.Unverified, 1)}
		report(r, bad...)
		report(r, bad...)
		report(r, bad...)
		if n := patches(); n != 1 {
			t.Fatalf("%d status patches after 3 identical reports, want 1", n)
		}
		first := condition(t, cs)

		clk.Step(4 * time.Minute)
		report(r, bad...)
		if n := patches(); n != 1 {
			t.Fatalf("%d status patches before the heartbeat, want 1", n)
		}
		clk.Step(time.Minute) // heartbeat due, no Report needed
		synctest.Wait()
		if n := patches(); n != 2 {
			t.Fatalf("%d status patches after the heartbeat interval, want 2", n)
		}
		hb := condition(t, cs)
		if !hb.LastHeartbeatTime.After(first.LastHeartbeatTime.Time) {
			t.Errorf("heartbeat %v not after %v", hb.LastHeartbeatTime, first.LastHeartbeatTime)
		}
		if !hb.LastTransitionTime.Equal(&first.LastTransitionTime) {
			t.Errorf("lastTransitionTime moved on a heartbeat: %v -> %v", first.LastTransitionTime, hb.LastTransitionTime)
		}

		// A new message with the same status: patched at once, transition kept.
		clk.Step(time.Second)
		report(r, img('a', verdict.Unverified, 1), img('b', verdict.Untrusted, 1))
		if n := patches(); n != 3 {
			t.Fatalf("%d status patches after a message change, want 3", n)
		}
		if c := condition(t, cs); !c.LastTransitionTime.Equal(&first.LastTransitionTime) {
			t.Errorf("lastTransitionTime moved without a status change")
		}

		// Status change: patched, transition time moves.
		clk.Step(time.Second)
		report(r, img('a', verdict.Verified, 1))
		if n := patches(); n != 4 {
			t.Fatalf("%d status patches after a status change, want 4", n)
		}
		c := condition(t, cs)
		if c.Status != corev1.ConditionFalse || !c.LastTransitionTime.Time.Equal(clk.Now().Truncate(time.Second)) {
			t.Errorf("after the change: %s at %v, want False at %v", c.Status, c.LastTransitionTime, clk.Now())
		}
	})
}

func TestConditionAfterRestart(t *testing.T) {
	t0 := time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC) // synctest's epoch
	msg := "1 running image fails policy: reg.example/a:1 (aaaaaaaaaaaa unverified/no-signature)"
	tests := []struct {
		name        string
		imgs        []nodestate.Image
		wantPatches int
		wantStatus  corev1.ConditionStatus
	}{
		{"same state: nothing written", []nodestate.Image{img('a', verdict.Unverified, 1)}, 0, corev1.ConditionTrue},
		{"running images still pending: the True condition is held", []nodestate.Image{img('a', verdict.Pending, 1)},
			0, corev1.ConditionTrue},
		{"decided and trusted: lifted", []nodestate.Image{img('a', verdict.Verified, 1)}, 1, corev1.ConditionFalse},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				n := testNode(corev1.Taint{Key: TaintKey, Value: TaintValue, Effect: TaintEffect})
				n.Status.Conditions = []corev1.NodeCondition{
					{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady"},
					{Type: ConditionType, Status: corev1.ConditionTrue, Reason: ReasonUntrustedImageRunning, Message: msg,
						LastHeartbeatTime: metav1.NewTime(t0.Add(-time.Minute)), LastTransitionTime: metav1.NewTime(t0.Add(-time.Hour))},
				}
				cs := fake.NewClientset(n)
				r, stop := start(t, cs, WithEvents(false), WithQuarantineTaint(true))
				defer stop()
				report(r, tt.imgs...)
				if got := count(cs, "patch", "nodes", "status"); got != tt.wantPatches {
					t.Errorf("%d status patches, want %d", got, tt.wantPatches)
				}
				node := getNode(t, cs)
				c := condition(t, cs)
				if c.Status != tt.wantStatus {
					t.Errorf("condition %s, want %s", c.Status, tt.wantStatus)
				}
				if on := hasTaint(node.Spec.Taints); on != (tt.wantStatus == corev1.ConditionTrue) {
					t.Errorf("taint on=%v with condition %s", on, tt.wantStatus)
				}
				if len(node.Status.Conditions) != 2 || node.Status.Conditions[0].Type != corev1.NodeReady {
					t.Errorf("other conditions not kept: %+v", node.Status.Conditions)
				}
			})
		})
	}
}

func TestQuarantineTaint(t *testing.T) {
	others := []corev1.Taint{
		{Key: "dedicated", Value: "gpu", Effect: corev1.TaintEffectNoSchedule},
		{Key: TaintKey, Value: TaintValue, Effect: corev1.TaintEffectNoExecute}, // same key, other effect: not ours
		{Key: "node.kubernetes.io/unreachable", Effect: corev1.TaintEffectNoExecute},
	}
	ours := corev1.Taint{Key: TaintKey, Value: TaintValue, Effect: TaintEffect}
	bad := []nodestate.Image{img('a', verdict.Unverified, 1)}
	good := []nodestate.Image{img('a', verdict.Verified, 1)}
	idle := []nodestate.Image{img('a', verdict.Unverified, 0)}
	tests := []struct {
		name    string
		on      bool
		initial []corev1.Taint
		steps   [][]nodestate.Image
		want    [][]corev1.Taint // taints after each step
	}{
		{"added exactly while True, removed after, others kept", true, others,
			[][]nodestate.Image{good, bad, bad, idle, bad, good},
			[][]corev1.Taint{others, append(slices.Clone(others), ours), append(slices.Clone(others), ours), others,
				append(slices.Clone(others), ours), others}},
		{"a wrong value of our taint is corrected", true,
			[]corev1.Taint{{Key: TaintKey, Value: "false", Effect: TaintEffect}},
			[][]nodestate.Image{bad}, [][]corev1.Taint{{ours}}},
		{"off: never added", false, others,
			[][]nodestate.Image{bad, good}, [][]corev1.Taint{others, others}},
		// The incident switch: with quarantineTaint off, pinwarden's taint
		// (left by an earlier config) is lifted; the others are kept.
		{"off: pinwarden's taint is lifted", false, append(slices.Clone(others), ours),
			[][]nodestate.Image{good, bad, good},
			[][]corev1.Taint{others, others, others}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				cs := fake.NewClientset(testNode(tt.initial...))
				r, stop := start(t, cs, WithEvents(false), WithQuarantineTaint(tt.on))
				defer stop()
				for i, s := range tt.steps {
					report(r, s...)
					got := getNode(t, cs).Spec.Taints
					if !taintsEqual(got, tt.want[i]) {
						t.Errorf("step %d: taints %v, want %v", i, got, tt.want[i])
					}
				}
				if !tt.on && !hasTaint(tt.initial) && count(cs, "patch", "nodes", "") != 0 {
					t.Errorf("taint option off, no taint of ours, but nodes were patched")
				}
			})
		})
	}
}

func taintsEqual(a, b []corev1.Taint) bool {
	return slices.EqualFunc(a, b, func(x, y corev1.Taint) bool {
		return x.Key == y.Key && x.Value == y.Value && x.Effect == y.Effect
	})
}

// preconditionReactor makes node patches honour a metadata.resourceVersion
// precondition as the API server does (the fake tracker ignores it), and
// bumps the stored resourceVersion on every successful patch.
func preconditionReactor(t *testing.T, cs *fake.Clientset, before func()) {
	cs.PrependReactor("patch", "nodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
		pa := a.(k8stesting.PatchAction)
		if pa.GetSubresource() != "" {
			return false, nil, nil
		}
		if before != nil {
			before()
		}
		var p struct {
			Metadata struct {
				ResourceVersion string `json:"resourceVersion"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(pa.GetPatch(), &p); err != nil {
			return true, nil, apierrors.NewBadRequest(err.Error())
		}
		cur := getNode(t, cs)
		if p.Metadata.ResourceVersion != "" && p.Metadata.ResourceVersion != cur.ResourceVersion {
			return true, nil, apierrors.NewConflict(nodesGVR.GroupResource(), nodeName, errors.New("the object has been modified"))
		}
		return false, nil, nil // the tracker applies it
	})
}

func TestTaintPatchConflictKeepsConcurrentTaint(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cs := fake.NewClientset(testNode())
		foreign := corev1.Taint{Key: "example.com/maintenance", Value: "true", Effect: corev1.TaintEffectNoSchedule}
		interfered := false
		preconditionReactor(t, cs, func() {
			if interfered {
				return
			}
			interfered = true // someone else adds a taint between our get and our patch
			n := getNode(t, cs)
			n.Spec.Taints = append(n.Spec.Taints, foreign)
			n.ResourceVersion = "7"
			if err := cs.Tracker().Update(nodesGVR, n, ""); err != nil {
				t.Errorf("interfere: %v", err)
			}
		})
		r, stop := start(t, cs, WithEvents(false), WithQuarantineTaint(true))
		defer stop()
		report(r, img('a', verdict.Unverified, 1))
		want := []corev1.Taint{foreign, {Key: TaintKey, Value: TaintValue, Effect: TaintEffect}}
		if got := getNode(t, cs).Spec.Taints; !taintsEqual(got, want) {
			t.Errorf("taints %v, want %v", got, want)
		}
		if n := count(cs, "patch", "nodes", ""); n != 2 {
			t.Errorf("%d taint patches, want 2 (one conflict, one success)", n)
		}
	})
}

// failFirst makes the first n calls of verb on resource/sub fail with a
// server error.
func failFirst(cs *fake.Clientset, verb, resource, sub string, n int) *atomic.Int32 {
	calls := new(atomic.Int32)
	cs.PrependReactor(verb, resource, func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetSubresource() != sub || calls.Load() >= int32(n) {
			return false, nil, nil
		}
		calls.Add(1)
		return true, nil, apierrors.NewInternalError(errors.New("etcd is sad"))
	})
	return calls
}

func TestFailedWritesAreRetried(t *testing.T) {
	tests := []struct {
		name                string
		verb, resource, sub string
		fails               int
	}{
		{"condition patch", "patch", "nodes", "status", 3},
		{"taint patch", "patch", "nodes", "", 3},
		{"initial node get", "get", "nodes", "", 2},
		{"condition patch failing for long", "patch", "nodes", "status", 12},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				cs := fake.NewClientset(testNode())
				calls := failFirst(cs, tt.verb, tt.resource, tt.sub, tt.fails)
				r, stop := start(t, cs, WithQuarantineTaint(true))
				defer stop()
				report(r, img('a', verdict.Unverified, 1, "shop/api-1"))
				if calls.Load() == 0 {
					t.Fatal("the failure was never injected")
				}
				// No further Report: the desired state must not be lost.
				time.Sleep(time.Duration(tt.fails) * retryMax)
				synctest.Wait()
				if int(calls.Load()) != tt.fails {
					t.Errorf("%d failures injected, want %d", calls.Load(), tt.fails)
				}
				c := condition(t, cs)
				if c == nil || c.Status != corev1.ConditionTrue || c.Reason != ReasonUntrustedImageRunning {
					t.Errorf("condition did not converge: %+v", c)
				}
				if !hasTaint(getNode(t, cs).Spec.Taints) {
					t.Errorf("taint did not converge")
				}
				got := emitted(t, cs)
				if got["Node/node1/"+verdict.EventImageUnverified] != 1 || got["Pod/shop/api-1/"+verdict.EventImageUnverified] != 1 {
					t.Errorf("events %v", got)
				}
			})
		})
	}
}

// TestOnlyGrantedVerbs drives every feature and checks each request against
// the RBAC of the CONTRACT: get/patch nodes, patch nodes/status,
// create/patch events.
func TestOnlyGrantedVerbs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cs := fake.NewClientset(testNode(corev1.Taint{Key: "dedicated", Value: "x", Effect: corev1.TaintEffectNoSchedule}))
		failFirst(cs, "patch", "nodes", "status", 1)
		r, stop := start(t, cs, FromConfig(config.Kubernetes{Events: true, NodeCondition: true, QuarantineTaint: true})...)
		defer stop()
		r.Event(corev1.EventTypeNormal, verdict.EventImagePrefetched, "pulled reg.example/z:1")
		bad := []nodestate.Image{img('a', verdict.Unverified, 1, "shop/api-1"), drifted(img('b', verdict.Verified, 1), 'f')}
		good := []nodestate.Image{img('a', verdict.Verified, 1, "shop/api-1"), img('b', verdict.Verified, 1)}
		for range 3 {
			report(r, bad...)
			time.Sleep(2 * time.Second)
			report(r, good...)
		}
		time.Sleep(defaultHeartbeat)
		synctest.Wait()

		allowed := map[string]bool{"get nodes": true, "patch nodes": true, "patch nodes/status": true,
			"create events": true, "patch events": true}
		seen := map[string]bool{}
		for _, a := range cs.Actions() {
			k := a.GetVerb() + " " + a.GetResource().Resource
			if a.GetSubresource() != "" {
				k += "/" + a.GetSubresource()
			}
			if a.GetResource().Group != "" {
				k += " (group " + a.GetResource().Group + ")"
			}
			seen[k] = true
			if !allowed[k] {
				t.Errorf("request %q is outside the granted RBAC", k)
			}
		}
		// Not vacuous: every granted verb was exercised.
		for k := range allowed {
			if !seen[k] {
				t.Errorf("scenario never used %q; seen %v", k, seen)
			}
		}
	})
}

func TestReportAndEventNeverBlock(t *testing.T) {
	cs := fake.NewClientset(testNode())
	r := New(cs, nodeName, slog.New(slog.DiscardHandler))
	imgs := []nodestate.Image{img('a', verdict.Unverified, 1)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 100000 { // no worker is running
			r.Report(&nodestate.State{Images: imgs})
			r.Event(corev1.EventTypeWarning, verdict.EventImagePrefetchFailed, "x")
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Report/Event blocked without a running worker")
	}
	if n := len(r.queued); n != maxQueuedEvents {
		t.Errorf("%d queued events, want the cap %d", n, maxQueuedEvents)
	}
	if len(cs.Actions()) != 0 {
		t.Errorf("requests made without Run: %v", cs.Actions())
	}
}

func TestRunTwice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cs := fake.NewClientset(testNode())
		r, stop := start(t, cs)
		defer stop()
		synctest.Wait()
		if err := r.Run(context.Background()); !errors.Is(err, errRunning) {
			t.Errorf("second Run: %v, want errRunning", err)
		}
	})
}

func TestWithTaint(t *testing.T) {
	ours := corev1.Taint{Key: TaintKey, Value: TaintValue, Effect: TaintEffect}
	other := corev1.Taint{Key: "a", Value: "b", Effect: corev1.TaintEffectNoSchedule}
	tests := []struct {
		name    string
		in      []corev1.Taint
		want    bool
		out     []corev1.Taint
		changed bool
	}{
		{"add to none", nil, true, []corev1.Taint{ours}, true},
		{"already there", []corev1.Taint{other, ours}, true, []corev1.Taint{other, ours}, false},
		{"duplicate removed", []corev1.Taint{ours, other, ours}, true, []corev1.Taint{ours, other}, true},
		{"remove keeps order", []corev1.Taint{other, ours, {Key: "c", Effect: corev1.TaintEffectPreferNoSchedule}}, false,
			[]corev1.Taint{other, {Key: "c", Effect: corev1.TaintEffectPreferNoSchedule}}, true},
		{"remove last leaves nil", []corev1.Taint{ours}, false, nil, true},
		{"absent and unwanted", []corev1.Taint{other}, false, []corev1.Taint{other}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			out, changed := withTaint(slices.Clone(tt.in), tt.want)
			if changed != tt.changed || !taintsEqual(out, tt.out) || (tt.out == nil) != (out == nil) {
				t.Errorf("withTaint = %v, %v; want %v, %v", out, changed, tt.out, tt.changed)
			}
		})
	}
}

// TestRetrierBackoff: the waits after consecutive failures start at
// retryBase, double up to retryMax, carry up to 10% jitter, and start over
// after a success.
func TestRetrierBackoff(t *testing.T) {
	t.Parallel()
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second,
		32 * time.Second, time.Minute, time.Minute}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var r retrier
	for round := range 2 {
		for i, w := range want {
			d := r.failed(now)
			if d < w || d > w+w/10 {
				t.Fatalf("round %d, failure %d: wait %v, want in [%v, %v]", round, i+1, d, w, w+w/10)
			}
			if !r.waiting(now.Add(d-time.Millisecond)) || r.waiting(now.Add(d)) {
				t.Fatalf("failure %d: waiting() wrong around the retry time", i+1)
			}
		}
		r.succeeded()
		if r.waiting(now) {
			t.Fatal("waiting after a success")
		}
	}
}
