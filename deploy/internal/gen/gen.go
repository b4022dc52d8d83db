// Package gen generates deploy's derived files from their one source: the
// PrometheusRule from prometheus/alerts.yaml and the Grafana dashboard from
// Go code built with the Grafana Foundation SDK. cmd/deploygen writes them;
// deploy's tests fail when the checked-in files differ.
package gen

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"sigs.k8s.io/yaml"
)

// Paths of the generated files, relative to the deploy directory.
const (
	AlertsPath         = "prometheus/alerts.yaml"
	PrometheusRulePath = "kubernetes/components/monitoring/prometheusrule.yaml"
	DashboardPath      = "grafana/pinwarden.json"
)

// Files returns every generated file, keyed by its path relative to
// deployDir, rendered from the sources under deployDir.
func Files(deployDir string) (map[string][]byte, error) {
	alerts, err := os.ReadFile(filepath.Join(deployDir, AlertsPath))
	if err != nil {
		return nil, fmt.Errorf("read alert rules: %w", err)
	}
	rule, err := PrometheusRule(alerts)
	if err != nil {
		return nil, err
	}
	dash, err := Dashboard()
	if err != nil {
		return nil, err
	}
	return map[string][]byte{PrometheusRulePath: rule, DashboardPath: dash}, nil
}

// PrometheusRule wraps Prometheus rule groups (a rule file) into the
// Prometheus Operator's PrometheusRule.
func PrometheusRule(ruleFile []byte) ([]byte, error) {
	var rules struct {
		Groups []json.RawMessage `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(ruleFile, &rules); err != nil {
		return nil, fmt.Errorf("parse alert rules: %w", err)
	}
	if len(rules.Groups) == 0 {
		return nil, fmt.Errorf("alert rules: no groups")
	}
	obj := map[string]any{
		"apiVersion": "monitoring.coreos.com/v1",
		"kind":       "PrometheusRule",
		"metadata": map[string]any{
			"name": "pinwarden",
			// The labels older kube-prometheus rule selectors look for.
			"labels": map[string]string{"app.kubernetes.io/name": "pinwarden", "prometheus": "k8s", "role": "alert-rules"},
		},
		"spec": map[string]any{"groups": rules.Groups},
	}
	b, err := yaml.Marshal(obj)
	if err != nil {
		return nil, fmt.Errorf("render PrometheusRule: %w", err)
	}
	header := "# Generated from deploy/" + AlertsPath + " by `go generate ./...` in deploy/. Do not edit.\n"
	return append([]byte(header), b...), nil
}
