package deploy

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/prometheus/promql/parser"

	"github.com/pinwarden/pinwarden/agent/metrics"
	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/deploy/internal/gen"
)

// exportedMetric is one metric the agent exports, with its label names.
type exportedMetric map[string]bool

// exportedMetrics registers a real metrics set, publishes a state with one
// of everything, and returns the series names it exports (histograms as
// _bucket, _sum and _count) with their label names.
func exportedMetricLabels(t *testing.T) map[string]exportedMetric {
	t.Helper()
	m := metrics.New("test", 10)
	m.Publish(&nodestate.State{Images: []nodestate.Image{
		{Name: "r.example/a:v1", Tags: []string{"r.example/a:v1"}, Digest: "sha256:" + strings.Repeat("a", 64),
			Result: verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonNoSignature}, Running: 1,
			Pins: []nodestate.TagPin{{Tag: "r.example/a:v1", Digest: "sha256:" + strings.Repeat("b", 64)}}},
	}})
	mfs, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]exportedMetric{}
	add := func(name string, labels []*dto.LabelPair, extra ...string) {
		l := exportedMetric{}
		for _, lp := range labels {
			l[lp.GetName()] = true
		}
		for _, e := range extra {
			l[e] = true
		}
		if out[name] == nil {
			out[name] = exportedMetric{}
		}
		for k := range l {
			out[name][k] = true
		}
	}
	for _, mf := range mfs {
		for _, mt := range mf.GetMetric() {
			switch mf.GetType() {
			case dto.MetricType_HISTOGRAM:
				add(mf.GetName()+"_bucket", mt.GetLabel(), "le")
				add(mf.GetName()+"_sum", mt.GetLabel())
				add(mf.GetName()+"_count", mt.GetLabel())
			case dto.MetricType_SUMMARY:
				add(mf.GetName(), mt.GetLabel(), "quantile")
				add(mf.GetName()+"_sum", mt.GetLabel())
				add(mf.GetName()+"_count", mt.GetLabel())
			default:
				add(mf.GetName(), mt.GetLabel())
			}
		}
	}
	if len(out) < 20 || out["pinwarden_image_problems"] == nil || out["pinwarden_tag_digest"] == nil {
		t.Fatalf("the metrics set exports only %d series names", len(out))
	}
	return out
}

func exportedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	for k := range exportedMetricLabels(t) {
		out[k] = true
	}
	return out
}

// selectors returns every vector selector of expr.
func selectors(expr parser.Expr) []*parser.VectorSelector {
	var out []*parser.VectorSelector
	parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			out = append(out, vs)
		}
		return nil
	})
	return out
}

// grafanaVars stand in for Grafana's variables so the PromQL parses.
var grafanaVars = strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$__range", "1h", "$node", ".*")

// scrapeLabels are added by the scrape, not by the agent.
var scrapeLabels = map[string]bool{"node": true, "job": true, "instance": true}

type panel struct {
	Type    string `json:"type"`
	Title   string `json:"title"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
	Panels []panel `json:"panels"`
}

// TestDashboardQueries parses every panel's PromQL and checks that it names
// only metrics and labels that the agent exports (`process_*` and the like
// come from the agent's registry too).
func TestDashboardQueries(t *testing.T) {
	b, err := os.ReadFile(gen.DashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		UID    string  `json:"uid"`
		Panels []panel `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	exported := exportedMetricLabels(t)
	var panels []panel
	for _, p := range d.Panels {
		panels = append(panels, p)
		panels = append(panels, p.Panels...)
	}
	var queries int
	seen := map[string]bool{}
	for _, p := range panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			queries++
			expr, err := promql.ParseExpr(grafanaVars.Replace(tg.Expr))
			if err != nil {
				t.Errorf("panel %q: %q: %v", p.Title, tg.Expr, err)
				continue
			}
			for _, vs := range selectors(expr) {
				labels, ok := exported[vs.Name]
				if !ok {
					t.Errorf("panel %q uses %q, which the agent does not export", p.Title, vs.Name)
					continue
				}
				seen[vs.Name] = true
				for _, m := range vs.LabelMatchers {
					if m.Name != "__name__" && !labels[m.Name] && !scrapeLabels[m.Name] {
						t.Errorf("panel %q: %s has no label %q", p.Title, vs.Name, m.Name)
					}
				}
			}
			parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
				if ae, ok := n.(*parser.AggregateExpr); ok {
					for _, g := range ae.Grouping {
						if !scrapeLabels[g] && !anyHasLabel(exported, selectors(ae.Expr), g) {
							t.Errorf("panel %q groups by %q, which its metrics do not carry", p.Title, g)
						}
					}
				}
				return nil
			})
		}
	}
	if queries < 15 {
		t.Errorf("only %d queries in the dashboard", queries)
	}
	// The list: verdicts, problems, verification latency and results,
	// prefetch, runtime, reloads, dropped series.
	for _, m := range []string{"pinwarden_images", "pinwarden_image_problems", "pinwarden_verification_duration_seconds_bucket",
		"pinwarden_verifications_total", "pinwarden_prefetch_total", "pinwarden_runtime_up", "pinwarden_config_reloads_total",
		"pinwarden_image_problems_dropped", "pinwarden_tag_digest"} {
		if !seen[m] {
			t.Errorf("no panel shows %s", m)
		}
	}
}

func anyHasLabel(exported map[string]exportedMetric, vss []*parser.VectorSelector, label string) bool {
	for _, vs := range vss {
		if exported[vs.Name][label] {
			return true
		}
	}
	return false
}

// promql parses PromQL with the default options (Prometheus' own functions).
var promql = parser.NewParser(parser.Options{})
