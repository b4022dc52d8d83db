package loop_test

import (
	"reflect"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/loop"
	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// TestBuildState: one node-state image per inventory image, with its
// verdict (pending/queued until judged), name, running containers, pods and
// pinned tags. The views of it are tested in agent/metrics and agent/status.
func TestBuildState(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	runningC := []inventory.ContainerRef{
		{ID: "c1", PodNamespace: "b", PodName: "p2"},
		{ID: "c2", PodNamespace: "a", PodName: "p1"},
		{ID: "c3", PodNamespace: "b", PodName: "p2"},
		{ID: "c4"}, // not in a pod
	}
	verified := verdict.Result{Verdict: verdict.Verified, Signers: []string{"k"}, VerifiedAt: at, Source: verdict.SourceCache, Policy: "p"}
	tests := []struct {
		name   string
		img    inventory.Image
		result *verdict.Result
		pinned map[string]string
		want   nodestate.Image
	}{
		{
			name:   "verified, idle, unpinned",
			img:    inventory.Image{Digest: dg(1), ImageID: dg(11), Repos: []string{"r.io/a"}, Tags: []string{"r.io/a:v1"}},
			result: &verified,
			want:   nodestate.Image{Name: "r.io/a:v1", Tags: []string{"r.io/a:v1"}, Digest: dg(1), ImageID: dg(11), Result: verified},
		},
		{
			name: "not judged yet: pending/queued",
			img:  inventory.Image{Digest: dg(2), Repos: []string{"r.io/b"}},
			want: nodestate.Image{Name: "r.io/b", Digest: dg(2),
				Result: verdict.Result{Digest: dg(2), Verdict: verdict.Pending, Reason: verdict.ReasonQueued}},
		},
		{
			name:   "running: containers counted, pods deduplicated and sorted",
			img:    inventory.Image{Digest: dg(3), Tags: []string{"r.io/c:v1", "r.io/c:latest"}, Containers: runningC},
			result: &verdict.Result{Verdict: verdict.Untrusted, Reason: verdict.ReasonNoPolicy, VerifiedAt: at},
			want: nodestate.Image{Name: "r.io/c:v1", Tags: []string{"r.io/c:v1", "r.io/c:latest"}, Digest: dg(3),
				Result:  verdict.Result{Verdict: verdict.Untrusted, Reason: verdict.ReasonNoPolicy, VerifiedAt: at},
				Running: 4, Pods: []string{"a/p1", "b/p2"}},
		},
		{
			name:   "pinned tag elsewhere: drifted",
			img:    inventory.Image{Digest: dg(4), Tags: []string{"r.io/d:v1", "r.io/d:v2"}},
			result: &verified,
			pinned: map[string]string{"r.io/d:v2": dg(44)},
			want: nodestate.Image{Name: "r.io/d:v1", Tags: []string{"r.io/d:v1", "r.io/d:v2"}, Digest: dg(4), Result: verified,
				Pins: []nodestate.TagPin{{Tag: "r.io/d:v2", Digest: dg(44)}}},
		},
		{
			name:   "pinned tag here: no drift; pins of other images ignored",
			img:    inventory.Image{Digest: dg(5), Tags: []string{"r.io/e:v1"}},
			result: &verdict.Result{Verdict: verdict.Ignored},
			pinned: map[string]string{"r.io/e:v1": dg(5), "r.io/other:v1": dg(6)},
			want: nodestate.Image{Name: "r.io/e:v1", Tags: []string{"r.io/e:v1"}, Digest: dg(5),
				Result: verdict.Result{Verdict: verdict.Ignored}, Pins: []nodestate.TagPin{{Tag: "r.io/e:v1", Digest: dg(5)}}},
		},
		{
			name:   "no name: named by the image ID",
			img:    inventory.Image{Digest: dg(7), ImageID: dg(77)},
			result: &verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonThresholdNotMet},
			want: nodestate.Image{Name: dg(77), Digest: dg(7), ImageID: dg(77),
				Result: verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonThresholdNotMet}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			results := map[string]verdict.Result{}
			if tt.result != nil {
				results[tt.img.Digest] = *tt.result
			}
			st := loop.BuildState([]inventory.Image{tt.img}, results, tt.pinned)
			if len(st.Images) != 1 {
				t.Fatalf("got %d images", len(st.Images))
			}
			if got := st.Images[0]; !reflect.DeepEqual(got, tt.want) {
				t.Errorf("image\n got %+v\nwant %+v", got, tt.want)
			}
			if got := st.Images[0]; got.Drifted() != (tt.name == "pinned tag elsewhere: drifted") {
				t.Errorf("Drifted() = %v", got.Drifted())
			}
		})
	}
}

// TestBuildStateOnlyNodeImages: verdicts of digests no longer on the node
// are not in the state.
func TestBuildStateOnlyNodeImages(t *testing.T) {
	t.Parallel()
	snap := []inventory.Image{{Digest: dg(1), Repos: []string{"r.io/a"}}}
	results := map[string]verdict.Result{
		dg(1): {Verdict: verdict.Verified},
		dg(2): {Verdict: verdict.Untrusted, Reason: verdict.ReasonDenied},
	}
	st := loop.BuildState(snap, results, nil)
	if len(st.Images) != 1 || st.Images[0].Digest != dg(1) || st.Images[0].Result.Verdict != verdict.Verified {
		t.Errorf("state %+v", st)
	}
}
