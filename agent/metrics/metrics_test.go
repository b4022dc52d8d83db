package metrics

import (
	"bytes"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"

	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/test/harness"
)

func exposition(t *testing.T, m *Metrics) string {
	t.Helper()
	mfs, err := m.Registry().Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			t.Fatalf("encode: %v", err)
		}
	}
	return buf.String()
}

func TestProblemSeriesAreCapped(t *testing.T) {
	t.Parallel()
	m := New("test", 500)
	s := &nodestate.State{}
	for i := range 600 {
		tag := fmt.Sprintf("r.example/img%03d:v1", i)
		im := nodestate.Image{Name: tag, Tags: []string{tag}, Digest: fmt.Sprintf("sha256:%064d", i),
			Result: verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonNoSignature},
			Pins:   []nodestate.TagPin{{Tag: tag, Digest: fmt.Sprintf("sha256:%064d", i)}}}
		if i == 599 {
			im.Running = 1
		}
		s.Images = append(s.Images, im)
	}
	m.Publish(s)
	if n := testutil.CollectAndCount(stateCollector{m}, "pinwarden_image_problems"); n != 500 {
		t.Errorf("problem series = %d, want 500", n)
	}
	if n := testutil.CollectAndCount(stateCollector{m}, "pinwarden_tag_digest"); n != 500 {
		t.Errorf("tag series = %d, want 500", n)
	}
	out := exposition(t, m)
	if !strings.Contains(out, "pinwarden_image_problems_dropped 100") {
		t.Errorf("dropped count missing:\n%s", grep(out, "dropped"))
	}
	// The running problem is the most important one and must survive the cap.
	if !strings.Contains(out, `image="r.example/img599:v1"`) || !strings.Contains(out, `running="true"`) {
		t.Errorf("running problem was dropped by the cap")
	}
}

func TestEventMetrics(t *testing.T) {
	t.Parallel()
	m := New("test", 10)
	m.RuntimeEvent("/images/create")
	m.RuntimeEvent("/snapshot/prepare") // unknown topics are bounded
	m.Verification(verdict.Result{Verdict: verdict.Verified, Source: verdict.SourceRegistry}, 10*time.Millisecond)
	m.Verification(verdict.Result{Verdict: verdict.Pending, Source: verdict.SourceRegistry}, time.Millisecond)
	m.Verification(verdict.Result{Verdict: verdict.Unverified, Source: verdict.SourceCache}, 0)
	m.ConfigReload(false)
	m.Resynced(time.Unix(1700000000, 0))
	m.CacheHit()
	m.CacheHit()
	m.CacheMiss()
	m.RelistRepaired(3)
	m.RelistRepaired(2)
	checks := map[string]float64{
		`pinwarden_cache_lookups_total{result="hit"}`:                        2,
		`pinwarden_cache_lookups_total{result="miss"}`:                       1,
		`pinwarden_inventory_repairs_total`:                                  5,
		`pinwarden_runtime_events_total{topic="/images/create"}`:             1,
		`pinwarden_runtime_events_total{topic="other"}`:                      1,
		`pinwarden_verifications_total{result="verified",source="registry"}`: 1,
		`pinwarden_verifications_total{result="error",source="registry"}`:    1,
		`pinwarden_verifications_total{result="unverified",source="cache"}`:  1,
		`pinwarden_config_reloads_total{result="failure"}`:                   1,
		`pinwarden_config_last_reload_success`:                               0,
		`pinwarden_resyncs_total`:                                            1,
		`pinwarden_last_resync_timestamp_seconds`:                            1.7e+09,
	}
	out := exposition(t, m)
	for series, want := range checks {
		line := series + " " + formatFloat(want)
		if !strings.Contains(out, line+"\n") {
			t.Errorf("missing %q; have:\n%s", line, grep(out, strings.SplitN(series, "{", 2)[0]))
		}
	}
}

// TestPromtoolCheckMetrics runs the real promtool linter on the exposition.
func TestPromtoolCheckMetrics(t *testing.T) {
	t.Parallel()
	promtool := harness.RequireBinary(t, "promtool")
	m := New("test", 5)
	m.Publish(&nodestate.State{Images: []nodestate.Image{
		{Name: "r.example/a:v1", Tags: []string{"r.example/a:v1"}, Digest: "sha256:" + strings.Repeat("a", 64),
			Result: verdict.Result{Verdict: verdict.Verified}, Running: 1,
			Pins: []nodestate.TagPin{{Tag: "r.example/a:v1", Digest: "sha256:" + strings.Repeat("b", 64)}}},
		{Name: "r.example/b", Digest: "sha256:" + strings.Repeat("c", 64), Result: verdict.Result{Verdict: verdict.Verified}},
		{Name: "r.example/c", Digest: "sha256:" + strings.Repeat("d", 64),
			Result: verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonNoSignature}},
	}})
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(exposition(t, m))
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}

func formatFloat(f float64) string {
	return strings.TrimSuffix(fmt.Sprintf("%g", f), ".0")
}

func grep(s, sub string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// TestViewOfNodeState: the state-style metrics derived from a node state:
// one verdict problem per problem image, one drift problem per drifted
// pinned tag, a tag series for every pinned tag and every tag of a running
// image.
func TestViewOfNodeState(t *testing.T) {
	t.Parallel()
	dg := func(i int) string { return fmt.Sprintf("sha256:%064d", i) }
	res := func(v verdict.Verdict, reason string) verdict.Result {
		return verdict.Result{Verdict: v, Reason: reason}
	}
	tests := []struct {
		name         string
		img          nodestate.Image
		wantProblems []problem
		wantTags     []tagDigest
		wantDrifted  int
	}{
		{name: "verified, not running, not pinned: nothing",
			img: nodestate.Image{Name: "r.io/a:v1", Tags: []string{"r.io/a:v1"}, Digest: dg(1), Result: res(verdict.Verified, "")}},
		{name: "pending",
			img:          nodestate.Image{Name: "r.io/b", Digest: dg(2), Result: res(verdict.Pending, verdict.ReasonQueued)},
			wantProblems: []problem{{image: "r.io/b", digest: dg(2), problem: problemPending, reason: verdict.ReasonQueued}}},
		{name: "untrusted and running: every tag has a series",
			img: nodestate.Image{Name: "r.io/c:v1", Tags: []string{"r.io/c:v1", "r.io/c:latest"}, Digest: dg(3),
				Result: res(verdict.Untrusted, verdict.ReasonNoPolicy), Running: 4},
			wantProblems: []problem{{image: "r.io/c:v1", digest: dg(3), problem: problemUntrusted, reason: verdict.ReasonNoPolicy, running: true}},
			wantTags:     []tagDigest{{"r.io/c:v1", dg(3)}, {"r.io/c:latest", dg(3)}}},
		{name: "a drifted pinned tag beside an unpinned one",
			img: nodestate.Image{Name: "r.io/d:v1", Tags: []string{"r.io/d:v1", "r.io/d:v2"}, Digest: dg(4),
				Result: res(verdict.Verified, ""), Pins: []nodestate.TagPin{{Tag: "r.io/d:v2", Digest: dg(44)}}},
			wantProblems: []problem{{image: "r.io/d:v2", digest: dg(4), problem: problemDrifted, reason: verdict.ReasonPinMismatch}},
			wantTags:     []tagDigest{{"r.io/d:v2", dg(4)}},
			wantDrifted:  1},
		{name: "pinned and matching: a tag series, no problem",
			img: nodestate.Image{Name: "r.io/e:v1", Tags: []string{"r.io/e:v1"}, Digest: dg(5),
				Result: res(verdict.Ignored, ""), Pins: []nodestate.TagPin{{Tag: "r.io/e:v1", Digest: dg(5)}}},
			wantTags: []tagDigest{{"r.io/e:v1", dg(5)}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			v := viewOf(&nodestate.State{Images: []nodestate.Image{tt.img}})
			if !slices.Equal(v.problems, tt.wantProblems) {
				t.Errorf("problems = %+v, want %+v", v.problems, tt.wantProblems)
			}
			if !slices.Equal(v.tags, tt.wantTags) {
				t.Errorf("tags = %+v, want %+v", v.tags, tt.wantTags)
			}
			if v.drifted != tt.wantDrifted || v.images[tt.img.Result.Verdict] != 1 || v.running[tt.img.Result.Verdict] != tt.img.Running {
				t.Errorf("drifted %d images %v running %v", v.drifted, v.images, v.running)
			}
		})
	}
}

// TestCapProblemsOrder: the cap keeps running problems first, then drifted,
// then the worst verdict (verdict.Severity), then by image.
func TestCapProblemsOrder(t *testing.T) {
	t.Parallel()
	in := []problem{
		{image: "p", problem: problemPending},
		{image: "u", problem: problemUnverified},
		{image: "b", problem: problemUntrusted},
		{image: "a", problem: problemUntrusted},
		{image: "d", problem: problemDrifted},
		{image: "z", problem: problemPending, running: true},
	}
	var got []string
	for _, p := range capProblems(in, len(in)) {
		got = append(got, p.image)
	}
	if want := []string{"z", "d", "a", "b", "u", "p"}; !slices.Equal(got, want) {
		t.Errorf("order = %v, want %v", got, want)
	}
}
