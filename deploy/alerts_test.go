package deploy

import (
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/pinwarden/pinwarden/deploy/internal/gen"
	"github.com/pinwarden/pinwarden/test/harness"
)

// TestAlertRules runs promtool's rule checker and the rule unit tests.
func TestAlertRules(t *testing.T) {
	promtool := harness.RequireBinary(t, "promtool")
	for _, args := range [][]string{{"check", "rules", "prometheus/alerts.yaml"}, {"test", "rules", "prometheus/alerts_test.yaml"}} {
		out, err := exec.Command(promtool, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %v: %v\n%s", args, err, out)
		}
	}
}

type alertRule struct {
	Alert       string            `json:"alert"`
	Expr        string            `json:"expr"`
	For         string            `json:"for"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
}

func loadAlerts(t *testing.T) []alertRule {
	t.Helper()
	b, err := os.ReadFile(gen.AlertsPath)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []struct {
			Rules []alertRule `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	var out []alertRule
	for _, g := range f.Groups {
		out = append(out, g.Rules...)
	}
	if len(out) == 0 {
		t.Fatal("no alert rules")
	}
	return out
}

// TestEveryAlertIsTested: every alert has a promtool case where it fires
// and one where it is expected not to.
func TestEveryAlertIsTested(t *testing.T) {
	b, err := os.ReadFile("prometheus/alerts_test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string           `json:"alertname"`
				ExpAlerts []map[string]any `json:"exp_alerts"`
			} `json:"alert_rule_test"`
		} `json:"tests"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	for _, tc := range f.Tests {
		for _, a := range tc.AlertRuleTest {
			if len(a.ExpAlerts) > 0 {
				fires[a.Alertname] = true
			} else {
				quiet[a.Alertname] = true
			}
		}
	}
	for _, r := range loadAlerts(t) {
		if !fires[r.Alert] {
			t.Errorf("%s has no promtool case in which it fires", r.Alert)
		}
		if !quiet[r.Alert] {
			t.Errorf("%s has no promtool case in which it stays quiet", r.Alert)
		}
	}
}

const runbookBase = "https://github.com/pinwarden/pinwarden/blob/main/docs/runbook.md#"

// TestAlertRunbooks: every alert links to its own section of docs/runbook.md.
func TestAlertRunbooks(t *testing.T) {
	b, err := os.ReadFile("../docs/runbook.md")
	if err != nil {
		t.Fatal(err)
	}
	headings := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^## (\S+)\s*$`).FindAllStringSubmatch(string(b), -1) {
		headings[m[1]] = true
	}
	for _, r := range loadAlerts(t) {
		if want := runbookBase + strings.ToLower(r.Alert); r.Annotations["runbook_url"] != want {
			t.Errorf("%s: runbook_url = %q, want %q", r.Alert, r.Annotations["runbook_url"], want)
		}
		if !headings[r.Alert] {
			t.Errorf("docs/runbook.md has no section \"## %s\"", r.Alert)
		}
		if !slices.Contains([]string{"critical", "warning", "info"}, r.Labels["severity"]) {
			t.Errorf("%s: severity %q", r.Alert, r.Labels["severity"])
		}
	}
}

// pendingMetrics are metrics that alerts use before the agent exports them:
// the quarantine guard's gauge (another change adds it; the alert is ready).
var pendingMetrics = map[string]bool{"pinwarden_quarantine_held_back": true}

// TestAlertsNameExportedMetrics: every pinwarden_* metric in an alert is one
// the agent exports.
func TestAlertsNameExportedMetrics(t *testing.T) {
	exported := exportedMetrics(t)
	for _, r := range loadAlerts(t) {
		expr, err := promql.ParseExpr(r.Expr)
		if err != nil {
			t.Errorf("%s: %v", r.Alert, err)
			continue
		}
		for _, vs := range selectors(expr) {
			if strings.HasPrefix(vs.Name, "pinwarden_") && !exported[vs.Name] && !pendingMetrics[vs.Name] {
				t.Errorf("%s uses %s, which the agent does not export", r.Alert, vs.Name)
			}
		}
	}
}
