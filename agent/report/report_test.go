package report

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const nodeName = "node1"

var (
	nodesGVR  = corev1.SchemeGroupVersion.WithResource("nodes")
	eventsGVR = corev1.SchemeGroupVersion.WithResource("events")
)

func testNode(taints ...corev1.Taint) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: nodeName, UID: "uid-1", ResourceVersion: "1"},
		Spec:       corev1.NodeSpec{Taints: taints},
	}
}

func digest(c byte) string { return "sha256:" + strings.Repeat(string(c), 64) }

// img is an image with digest sha256:<c...>, named reg.example/<c>:1.
func img(c byte, v verdict.Verdict, running int, pods ...string) nodestate.Image {
	reason := map[verdict.Verdict]string{verdict.Unverified: verdict.ReasonNoSignature,
		verdict.Untrusted: verdict.ReasonDenied, verdict.Pending: verdict.ReasonQueued}[v]
	name := "reg.example/" + string(c) + ":1"
	return nodestate.Image{Name: name, Tags: []string{name}, Digest: digest(c),
		Result: verdict.Result{Verdict: v, Reason: reason}, Running: running, Pods: append([]string{}, pods...)}
}

// drifted pins im's tag to the digest sha256:<pinned...>.
func drifted(im nodestate.Image, pinned byte) nodestate.Image {
	im.Pins = []nodestate.TagPin{{Tag: im.Name, Digest: digest(pinned)}}
	return im
}

// start runs a Reporter on cs until the returned stop is called; use inside a
// synctest bubble.
func start(t *testing.T, cs *fake.Clientset, opts ...Option) (*Reporter, func()) {
	t.Helper()
	r := New(cs, nodeName, slog.New(slog.DiscardHandler), opts...)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	return r, func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
}

// report hands imgs to r and waits until the worker and the event
// broadcaster are idle. Time moves on first: the recorder names events after
// the node (or pod) and the time in nanoseconds, and in a bubble time only
// moves when told to, so two steps would otherwise collide on one name.
func report(r *Reporter, imgs ...nodestate.Image) {
	time.Sleep(time.Millisecond)
	r.Report(&nodestate.State{Images: imgs})
	synctest.Wait()
}

// emitted sums the Count of the stored events per "Kind/[ns/]name/reason":
// how often each was emitted, aggregation included. Read from the tracker,
// so it records no client action.
func emitted(t *testing.T, cs *fake.Clientset) map[string]int {
	t.Helper()
	obj, err := cs.Tracker().List(eventsGVR, corev1.SchemeGroupVersion.WithKind("Event"), "")
	if err != nil {
		t.Fatalf("list events: %v", err)
	}
	out := map[string]int{}
	for _, ev := range obj.(*corev1.EventList).Items {
		o := ev.InvolvedObject
		name := o.Name
		if o.Namespace != "" {
			name = o.Namespace + "/" + o.Name
		}
		out[o.Kind+"/"+name+"/"+ev.Reason] += int(ev.Count)
	}
	return out
}

func storedEvents(t *testing.T, cs *fake.Clientset) []corev1.Event {
	t.Helper()
	obj, err := cs.Tracker().List(eventsGVR, corev1.SchemeGroupVersion.WithKind("Event"), "")
	if err != nil {
		t.Fatalf("list events: %v", err)
	}
	return obj.(*corev1.EventList).Items
}

func getNode(t *testing.T, cs *fake.Clientset) *corev1.Node {
	t.Helper()
	obj, err := cs.Tracker().Get(nodesGVR, "", nodeName)
	if err != nil {
		t.Fatalf("get node: %v", err)
	}
	return obj.(*corev1.Node)
}

func condition(t *testing.T, cs *fake.Clientset) *corev1.NodeCondition {
	t.Helper()
	for _, c := range getNode(t, cs).Status.Conditions {
		if c.Type == ConditionType {
			return &c
		}
	}
	return nil
}

// count counts the client's actions with verb on resource/subresource.
func count(cs *fake.Clientset, verb, resource, sub string) int {
	n := 0
	for _, a := range cs.Actions() {
		if a.GetVerb() == verb && a.GetResource().Resource == resource && a.GetSubresource() == sub {
			n++
		}
	}
	return n
}

func TestEventsOnTransitions(t *testing.T) {
	const (
		node = "Node/" + nodeName + "/"
		p1   = "Pod/shop/api-1/"
		p2   = "Pod/shop/api-2/"
	)
	tests := []struct {
		name  string
		steps [][]nodestate.Image
		want  map[string]int
	}{
		{
			name: "unverified emits once on the node and once per pod; a resync emits nothing",
			steps: [][]nodestate.Image{
				{img('a', verdict.Unverified, 2, "shop/api-1", "shop/api-2"), img('b', verdict.Verified, 1, "shop/web")},
				{img('a', verdict.Unverified, 2, "shop/api-1", "shop/api-2"), img('b', verdict.Verified, 1, "shop/web")},
			},
			want: map[string]int{node + verdict.EventImageUnverified: 1, p1 + verdict.EventImageUnverified: 1, p2 + verdict.EventImageUnverified: 1},
		},
		{
			name: "leaving and re-entering emits again",
			steps: [][]nodestate.Image{
				{img('a', verdict.Unverified, 0)},
				{img('a', verdict.Verified, 0)},
				{img('a', verdict.Unverified, 0)},
			},
			want: map[string]int{node + verdict.EventImageUnverified: 2},
		},
		{
			name: "an image that leaves the node and comes back emits again",
			steps: [][]nodestate.Image{
				{img('a', verdict.Untrusted, 0)},
				{},
				{img('a', verdict.Untrusted, 0)},
			},
			want: map[string]int{node + verdict.EventImageUntrusted: 2},
		},
		{
			name: "pending is not an event, and a pending re-check does not re-emit",
			steps: [][]nodestate.Image{
				{img('a', verdict.Pending, 1, "shop/api-1")},
				{img('a', verdict.Unverified, 1, "shop/api-1")},
				{img('a', verdict.Pending, 1, "shop/api-1")},
				{img('a', verdict.Unverified, 1, "shop/api-1")},
			},
			want: map[string]int{node + verdict.EventImageUnverified: 1, p1 + verdict.EventImageUnverified: 1},
		},
		{
			name:  "pending only emits nothing",
			steps: [][]nodestate.Image{{img('a', verdict.Pending, 1, "shop/api-1")}},
			want:  map[string]int{},
		},
		{
			name: "drifted emits ImageDrifted beside the verdict problem",
			steps: [][]nodestate.Image{
				{drifted(img('a', verdict.Verified, 1, "shop/api-1"), 'f')},
				{drifted(img('a', verdict.Unverified, 1, "shop/api-1"), 'f')},
			},
			want: map[string]int{node + verdict.EventImageDrifted: 1, p1 + verdict.EventImageDrifted: 1,
				node + verdict.EventImageUnverified: 1, p1 + verdict.EventImageUnverified: 1},
		},
		{
			name: "unverified turning untrusted is a new problem",
			steps: [][]nodestate.Image{
				{img('a', verdict.Unverified, 0)},
				{img('a', verdict.Untrusted, 0)},
			},
			want: map[string]int{node + verdict.EventImageUnverified: 1, node + verdict.EventImageUntrusted: 1},
		},
		{
			name: "a pod that starts later on a problem image gets its own event",
			steps: [][]nodestate.Image{
				{img('a', verdict.Unverified, 1, "shop/api-1")},
				{img('a', verdict.Unverified, 2, "shop/api-1", "shop/api-2")},
				{img('a', verdict.Unverified, 2, "shop/api-1", "shop/api-2")},
			},
			want: map[string]int{node + verdict.EventImageUnverified: 1, p1 + verdict.EventImageUnverified: 1, p2 + verdict.EventImageUnverified: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				cs := fake.NewClientset(testNode())
				r, stop := start(t, cs, WithNodeCondition(false))
				defer stop()
				for _, s := range tt.steps {
					report(r, s...)
				}
				if got := emitted(t, cs); !mapsEqual(got, tt.want) {
					t.Errorf("emitted %v, want %v", got, tt.want)
				}
				for _, ev := range storedEvents(t, cs) {
					if ev.Type != corev1.EventTypeWarning || ev.Source.Component != Component || ev.Source.Host != nodeName {
						t.Errorf("event %s: type %q source %+v", ev.Reason, ev.Type, ev.Source)
					}
					switch ev.InvolvedObject.Kind {
					case "Node":
						if ev.Namespace != metav1.NamespaceDefault || ev.InvolvedObject.UID != "uid-1" {
							t.Errorf("node event in namespace %q with UID %q", ev.Namespace, ev.InvolvedObject.UID)
						}
					case "Pod":
						if ev.Namespace != ev.InvolvedObject.Namespace {
							t.Errorf("pod event in namespace %q for %s", ev.Namespace, ev.InvolvedObject.Namespace)
						}
					}
				}
			})
		})
	}
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestEventMessages(t *testing.T) {
	tests := []struct {
		name   string
		im     nodestate.Image
		reason string
		want   []string
	}{
		{"unverified", img('a', verdict.Unverified, 0), verdict.EventImageUnverified,
			[]string{"reg.example/a:1", "aaaaaaaaaaaa", "unverified", verdict.ReasonNoSignature}},
		{"untrusted", img('b', verdict.Untrusted, 0), verdict.EventImageUntrusted,
			[]string{"reg.example/b:1", "bbbbbbbbbbbb", "untrusted", verdict.ReasonDenied}},
		{"drifted", drifted(img('c', verdict.Verified, 0), 'f'), verdict.EventImageDrifted,
			[]string{"reg.example/c:1", "cccccccccccc", "drifted", digest('f')}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				cs := fake.NewClientset(testNode())
				r, stop := start(t, cs, WithNodeCondition(false))
				defer stop()
				report(r, tt.im)
				evs := storedEvents(t, cs)
				if len(evs) != 1 || evs[0].Reason != tt.reason {
					t.Fatalf("events %+v, want one %s", evs, tt.reason)
				}
				for _, w := range tt.want {
					if !strings.Contains(evs[0].Message, w) {
						t.Errorf("message %q lacks %q", evs[0].Message, w)
					}
				}
			})
		})
	}
}

func TestEventFromOtherComponents(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cs := fake.NewClientset(testNode())
		r := New(cs, nodeName, slog.New(slog.DiscardHandler), WithNodeCondition(false))
		// Sent before Run: must wait for the worker, not be lost.
		r.Event(corev1.EventTypeWarning, verdict.EventConfigInvalid, "config /etc/pinwarden/config.yaml: unknown key")
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- r.Run(ctx) }()
		synctest.Wait()
		time.Sleep(time.Millisecond)
		r.Event(corev1.EventTypeNormal, verdict.EventImagePrefetched, "pulled reg.example/a:1")
		synctest.Wait()
		got := emitted(t, cs)
		want := map[string]int{"Node/node1/" + verdict.EventConfigInvalid: 1, "Node/node1/" + verdict.EventImagePrefetched: 1}
		if !mapsEqual(got, want) {
			t.Errorf("emitted %v, want %v", got, want)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}

func TestEventsOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cs := fake.NewClientset(testNode())
		r, stop := start(t, cs, WithEvents(false))
		defer stop()
		r.Event(corev1.EventTypeWarning, verdict.EventConfigInvalid, "bad")
		report(r, img('a', verdict.Unverified, 1, "shop/api-1"))
		if n := len(storedEvents(t, cs)); n != 0 {
			t.Errorf("%d events with events off", n)
		}
		if c := condition(t, cs); c == nil || c.Status != corev1.ConditionTrue {
			t.Errorf("condition %+v, want True", c)
		}
	})
}

func TestCondition(t *testing.T) {
	many := make([]nodestate.Image, 0, 7)
	for c := byte('a'); c < 'a'+7; c++ {
		many = append(many, img(c, verdict.Unverified, 1))
	}
	tests := []struct {
		name     string
		imgs     []nodestate.Image
		status   corev1.ConditionStatus
		reason   string
		contains []string
		lacks    []string
	}{
		{"running unverified", []nodestate.Image{img('a', verdict.Unverified, 1), img('b', verdict.Verified, 3)},
			corev1.ConditionTrue, ReasonUntrustedImageRunning,
			[]string{"1 running image fails policy", "reg.example/a:1", "aaaaaaaaaaaa", "unverified/no-signature"},
			[]string{"reg.example/b:1"}},
		{"running untrusted", []nodestate.Image{img('a', verdict.Untrusted, 1)},
			corev1.ConditionTrue, ReasonUntrustedImageRunning, []string{"untrusted/denied"}, nil},
		{"running drifted only", []nodestate.Image{drifted(img('a', verdict.Verified, 1), 'f')},
			corev1.ConditionTrue, ReasonDriftedImageRunning, []string{"reg.example/a:1", "drifted"}, nil},
		{"drifted and unverified: the untrusted reason wins",
			[]nodestate.Image{drifted(img('a', verdict.Verified, 1), 'f'), img('b', verdict.Unverified, 1)},
			corev1.ConditionTrue, ReasonUntrustedImageRunning,
			[]string{"2 running images fail policy: reg.example/b:1 (bbbbbbbbbbbb unverified/no-signature), reg.example/a:1 (aaaaaaaaaaaa drifted)"}, nil},
		{"problems only on images not running", []nodestate.Image{img('a', verdict.Unverified, 0),
			drifted(img('b', verdict.Untrusted, 0), 'f'), img('c', verdict.Verified, 2)},
			corev1.ConditionFalse, ReasonImagesTrusted, []string{conditionMessageTrusted}, nil},
		{"running pending is not a problem", []nodestate.Image{img('a', verdict.Pending, 1)},
			corev1.ConditionFalse, ReasonImagesTrusted, nil, nil},
		{"message names at most 5 images", many, corev1.ConditionTrue, ReasonUntrustedImageRunning,
			[]string{"7 running images", "reg.example/a:1", "reg.example/e:1", "and 2 more"},
			[]string{"reg.example/f:1", "reg.example/g:1"}},
		{"no images", nil, corev1.ConditionFalse, ReasonImagesTrusted, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				cs := fake.NewClientset(testNode())
				r, stop := start(t, cs, WithEvents(false))
				defer stop()
				report(r, tt.imgs...)
				c := condition(t, cs)
				if c == nil {
					t.Fatal("no UntrustedImage condition")
				}
				if c.Status != tt.status || c.Reason != tt.reason {
					t.Errorf("condition %s/%s, want %s/%s", c.Status, c.Reason, tt.status, tt.reason)
				}
				for _, s := range tt.contains {
					if !strings.Contains(c.Message, s) {
						t.Errorf("message %q lacks %q", c.Message, s)
					}
				}
				for _, s := range tt.lacks {
					if strings.Contains(c.Message, s) {
						t.Errorf("message %q has %q", c.Message, s)
					}
				}
				if c.LastHeartbeatTime.IsZero() || c.LastTransitionTime.IsZero() {
					t.Errorf("timestamps missing: %+v", c)
				}
			})
		})
	}
}
