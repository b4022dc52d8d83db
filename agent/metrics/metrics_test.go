package metrics

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"

	"github.com/pinwarden/pinwarden/agent/verdict"
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
	s := &State{Images: map[verdict.Verdict]int{verdict.Unverified: 600}}
	for i := range 600 {
		s.Problems = append(s.Problems, Problem{Image: fmt.Sprintf("r.example/img%03d:v1", i),
			Digest: fmt.Sprintf("sha256:%064d", i), Problem: ProblemUnverified, Reason: verdict.ReasonNoSignature, Running: i == 599})
		s.Tags = append(s.Tags, TagDigest{Image: fmt.Sprintf("r.example/img%03d:v1", i), Digest: fmt.Sprintf("sha256:%064d", i)})
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
	checks := map[string]float64{
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
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("promtool not installed (CI must run this check)")
		}
		t.Skip("promtool not installed")
	}
	m := New("test", 5)
	m.Publish(&State{
		Images:   map[verdict.Verdict]int{verdict.Verified: 2, verdict.Unverified: 1},
		Running:  map[verdict.Verdict]int{verdict.Verified: 1},
		Problems: []Problem{{Image: "r.example/a:v1", Digest: "sha256:" + strings.Repeat("a", 64), Problem: ProblemDrifted, Reason: "pinned sha256:" + strings.Repeat("b", 12)}},
		Tags:     []TagDigest{{Image: "r.example/a:v1", Digest: "sha256:" + strings.Repeat("a", 64)}},
	})
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
