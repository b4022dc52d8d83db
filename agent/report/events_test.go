package report

import (
	"fmt"
	"log/slog"
	"testing"

	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"

	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

func manyImages(n int, v verdict.Verdict) []nodestate.Image {
	imgs := make([]nodestate.Image, n)
	for i := range imgs {
		imgs[i] = nodestate.Image{Name: fmt.Sprintf("reg.example/app%d:1", i), Digest: fmt.Sprintf("sha256:%064x", i),
			Result: verdict.Result{Verdict: v, Reason: verdict.ReasonNoSignature}, Running: 1, Pods: []string{fmt.Sprintf("ns/pod-%d", i)}}
	}
	return imgs
}

// TestEventsPerSyncAreCapped: 10,000 images turning unverified at once must
// not queue 20,000 events (node and pod); a resync afterwards sends none.
func TestEventsPerSyncAreCapped(t *testing.T) {
	r := New(fake.NewClientset(), nodeName, slog.New(slog.DiscardHandler))
	rec := record.NewFakeRecorder(2 * maxEventsPerSync)
	w := newWorker(r)
	w.recorder = rec
	imgs := manyImages(10000, verdict.Unverified)
	r.Report(&nodestate.State{Images: imgs})
	w.sync(t.Context()) // the node get fails (no node): events still go out
	if n := len(rec.Events); n != maxEventsPerSync {
		t.Errorf("%d events in one sync, want the cap %d", n, maxEventsPerSync)
	}
	r.Report(&nodestate.State{Images: imgs})
	w.sync(t.Context())
	if n := len(rec.Events); n != maxEventsPerSync {
		t.Errorf("%d events after a resync, want still %d", n, maxEventsPerSync)
	}
}

// BenchmarkSteadyState is the cost of one Report of 10,000 problem images
// that changed nothing: it runs on every loop publish.
func BenchmarkSteadyState(b *testing.B) {
	r := New(fake.NewClientset(), nodeName, slog.New(slog.DiscardHandler), WithEvents(false))
	w := newWorker(r)
	w.recorder = record.NewFakeRecorder(30000)
	imgs := manyImages(10000, verdict.Unverified)
	w.emitTransitions(imgs)
	b.ResetTimer()
	for b.Loop() {
		w.emitTransitions(imgs)
		w.decide(imgs, r.opts.clock.Now())
	}
}
