package deploy

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/pinwarden/pinwarden/test/harness"
)

// localConfig rewrites the shipped config at path for a run on this
// machine: the test's containerd, state directory and loopback ports, and
// no API server. Policies, keys and pins stay as shipped.
func localConfig(t *testing.T, path, runtimeEndpoint, metricsAddr, statusAddr string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["runtimeEndpoint"] = runtimeEndpoint
	cfg["stateDir"] = t.TempDir()
	cfg["metricsAddress"], cfg["statusAddress"] = metricsAddr, statusAddr
	kube, _ := cfg["kubernetes"].(map[string]any)
	if kube == nil {
		t.Fatal("shipped config has no kubernetes section")
	}
	kube["enabled"] = false
	if b, err = yaml.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestAgentStartsWithoutTheSecret runs the agent binary on the base's
// config as the DaemonSet mounts it before the Secret pinwarden-keys
// exists: it must start and become ready (no crash loop), report the
// missing key, and take the key up once the Secret's file appears.
func TestAgentStartsWithoutTheSecret(t *testing.T) {
	harness.SkipShort(t, "containerd and the agent binary")
	c := harness.StartContainerd(t)
	path := mountConfig(t, render(t, "kubernetes"), nil)
	metricsAddr, statusAddr := harness.FreeAddr(t), harness.FreeAddr(t)
	localConfig(t, path, c.Endpoint(), metricsAddr, statusAddr)
	bin, err := harness.AgentBinary(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	a := harness.StartAgent(t, bin, path, metricsAddr, statusAddr) // waits for /readyz

	harness.Eventually(t, 30*time.Second, "the missing key reported", func() (bool, string) {
		ok := harness.SumMetric(a.Metrics(), "pinwarden_config_last_reload_success") == 0 && strings.Contains(a.Log(), "ci.pub")
		return ok, "log:\n" + a.Log()
	})

	// kubectl create secret generic pinwarden-keys --from-file=ci.pub=...:
	// the kubelet adds the file to the projected volume.
	if err := os.WriteFile(filepath.Join(filepath.Dir(path), "ci.pub"), newKey(t), 0o444); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 30*time.Second, "the key loaded", func() (bool, string) {
		m := a.Metrics()
		return harness.SumMetric(m, "pinwarden_config_last_reload_success") == 1,
			fmt.Sprintf("config_last_reload_success %v", harness.SumMetric(m, "pinwarden_config_last_reload_success"))
	})
	select {
	case <-a.Exited():
		t.Fatalf("the agent exited:\n%s", a.Log())
	default:
	}
}
