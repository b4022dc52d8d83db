package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"slices"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/pinwarden/pinwarden/agent/config"
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

// TestRBACIsMinimal pins the ClusterRole to exactly what THREATS.md allows.
func TestRBACIsMinimal(t *testing.T) {
	docs := splitYAML(t, "kubernetes/rbac.yaml")
	type rule struct {
		APIGroups []string `json:"apiGroups"`
		Resources []string `json:"resources"`
		Verbs     []string `json:"verbs"`
	}
	var found bool
	for _, d := range docs {
		var obj struct {
			Kind  string `json:"kind"`
			Rules []rule `json:"rules"`
		}
		if err := yaml.Unmarshal(d, &obj); err != nil {
			t.Fatal(err)
		}
		if obj.Kind != "ClusterRole" {
			continue
		}
		found = true
		allowed := map[string][]string{"nodes": {"get", "patch"}, "nodes/status": {"patch"}, "events": {"create", "patch"}}
		for _, r := range obj.Rules {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					if !slices.Contains(allowed[res], v) {
						t.Errorf("ClusterRole grants %s on %s", v, res)
					}
				}
			}
		}
	}
	if !found {
		t.Fatal("no ClusterRole in rbac.yaml")
	}
}

// TestDaemonSetPosture checks the hardening of THREATS.md.
func TestDaemonSetPosture(t *testing.T) {
	b, err := os.ReadFile("kubernetes/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"readOnlyRootFilesystem: true", "allowPrivilegeEscalation: false", `drop: ["ALL"]`,
		"type: RuntimeDefault", "type: Socket", "path: /var/lib/pinwarden", "GOMEMLIMIT"} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("daemonset.yaml lacks %q", want)
		}
	}
	if bytes.Contains(b, []byte("privileged: true")) || bytes.Contains(b, []byte(":latest")) {
		t.Error("daemonset.yaml is privileged or uses :latest")
	}
}

// TestConfigMapConfigIsStrictlyValid parses the example config with the
// agent's own strict parser (key files are not present here, so only the
// syntax and keys are checked).
func TestConfigMapConfigIsStrictlyValid(t *testing.T) {
	var cm struct {
		Data map[string]string `json:"data"`
	}
	b, err := os.ReadFile("kubernetes/configmap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &cm); err != nil {
		t.Fatal(err)
	}
	c := config.Default()
	if err := yaml.UnmarshalStrict([]byte(cm.Data["config.yaml"]), c); err != nil {
		t.Fatalf("configmap config.yaml: %v", err)
	}
	if len(c.Policies) != 3 {
		t.Fatalf("policies = %d, want 3", len(c.Policies))
	}
}

func splitYAML(t *testing.T, path string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Split(b, []byte("\n---\n"))
}
