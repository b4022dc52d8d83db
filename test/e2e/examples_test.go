package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/pinwarden/pinwarden/test/harness"
)

// standInCRDs define the kinds of the drain-automation examples whose
// operators are not installed here (NodeHealthCheck, PrometheusRule). Their
// schemas keep every field: they check that the examples are well-formed
// objects the API server accepts, not the operators' own validation.
const standInCRDs = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: nodehealthchecks.remediation.medik8s.io}
spec:
  group: remediation.medik8s.io
  scope: Cluster
  names: {kind: NodeHealthCheck, plural: nodehealthchecks, singular: nodehealthcheck}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [unhealthyConditions]
              properties:
                unhealthyConditions:
                  type: array
                  items:
                    type: object
                    required: [type, status, duration]
                    properties:
                      type: {type: string}
                      status: {type: string}
                      duration: {type: string}
              x-kubernetes-preserve-unknown-fields: true
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PrometheusRule, plural: prometheusrules, singular: prometheusrule}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              x-kubernetes-preserve-unknown-fields: true
`

// Every drain-automation example in docs/examples is accepted by the real
// API server (a server-side dry run; the operators' CRDs are stand-ins), keys
// on what pinwarden writes, and the PrometheusRule's rules pass promtool.
func checkExamples(t *testing.T, c *kubeCluster) {
	dir := filepath.Join(repoRoot(t), "docs", "examples")
	c.Apply([]byte(standInCRDs))
	if _, err := c.Kubectl(nil, "wait", "--for", "condition=Established", "--timeout", "60s",
		"crd/nodehealthchecks.remediation.medik8s.io", "crd/prometheusrules.monitoring.coreos.com"); err != nil {
		t.Fatal(err)
	}
	c.Namespace("monitoring")
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) < 3 {
		t.Fatalf("examples: %v, %v", files, err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), "UntrustedImage") && !strings.Contains(string(b), "pinwarden.dev/untrusted-image") {
			t.Errorf("%s keys on neither the condition nor the taint", filepath.Base(f))
		}
		out := c.Apply(b, "--dry-run=server")
		t.Logf("%s: %s", filepath.Base(f), strings.TrimSpace(out))
	}

	// The PrometheusRule's groups are a Prometheus rule file.
	b, err := os.ReadFile(filepath.Join(dir, "prometheusrule.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var rule struct {
		Spec map[string]any `json:"spec"`
	}
	if err := yaml.Unmarshal(b, &rule); err != nil {
		t.Fatal(err)
	}
	groups, err := yaml.Marshal(rule.Spec)
	if err != nil {
		t.Fatal(err)
	}
	const promtool = "/usr/bin/promtool"
	harness.RequireBinary(t, promtool)
	rules := filepath.Join(t.TempDir(), "rules.yaml")
	if err := os.WriteFile(rules, groups, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.CommandContext(t.Context(), promtool, "check", "rules", rules).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules: %v\n%s", err, out)
	}
}
