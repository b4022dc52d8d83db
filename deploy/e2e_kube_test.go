// The install end to end against a real kube-apiserver (harness.StartKube)
// with real pods (harness.Pods).

package deploy

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/pinwarden/pinwarden/test/harness"
)

const promOperator = "github.com/prometheus-operator/prometheus-operator@v0.85.0"

// monitoringCRDs returns the directory of the Prometheus Operator's CRDs in
// the module cache (go mod download).
func monitoringCRDs(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "mod", "download", "-json", promOperator).Output()
	if err != nil {
		t.Fatalf("go mod download %s: %v", promOperator, err)
	}
	var m struct{ Dir string }
	if err := json.Unmarshal(out, &m); err != nil || m.Dir == "" {
		t.Fatalf("go mod download %s: %v %s", promOperator, err, out)
	}
	return filepath.Join(m.Dir, "example", "prometheus-operator-crd")
}

// TestInstallOnAPIServer applies the base and base+quarantine+monitoring
// with kubectl apply --server-side -k (and dry-runs the credential provider
// components with pull secrets and quarantine), then runs the agent on the install's
// ServiceAccount token against a real containerd with a running untrusted
// pod, and checks that its condition, taint and events land with no
// `forbidden`.
func TestInstallOnAPIServer(t *testing.T) {
	k := harness.StartKube(t)
	if out, err := k.Kubectl(nil, "apply", "--server-side", "-f", monitoringCRDs(t)); err != nil {
		t.Fatalf("monitoring CRDs: %v\n%s", err, out)
	}
	// Not `kubectl wait --for=condition=Established`: it fails outright when
	// it reads a CRD before the API server has set any condition on it.
	for _, crd := range []string{"servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com"} {
		harness.Eventually(t, 60*time.Second, crd+" established", func() (bool, string) {
			out, err := k.Kubectl(nil, "get", "crd/"+crd, "-o", `jsonpath={.status.conditions[?(@.type=="Established")].status}`)
			return err == nil && strings.TrimSpace(out) == "True", fmt.Sprintf("%q, %v", out, err)
		})
	}
	for _, dir := range []string{"kubernetes", "kubernetes/all"} {
		abs, err := filepath.Abs(dir)
		if err != nil {
			t.Fatal(err)
		}
		if out, err := k.Kubectl(nil, "apply", "--server-side", "-k", abs); err != nil {
			t.Fatalf("kubectl apply --server-side -k %s: %v\n%s", dir, err, out)
		}
	}
	// The credential provider components with the pull secrets and the
	// quarantine, in both orders, pass the API server's validation too:
	// server-side dry run, nothing changed.
	for _, tc := range credentialProviderCases {
		for _, components := range credentialProviderCombos(tc.component)[2:] {
			if out, err := k.Kubectl(nil, "apply", "--server-side", "--dry-run=server", "-k", withComponents(t, components...)); err != nil {
				t.Fatalf("kubectl apply --server-side --dry-run=server: base + %s: %v\n%s", strings.Join(components, " + "), err, out)
			}
		}
	}

	// A node with a running pod whose image nobody signed.
	const node = "node-e2e"
	k.Node(node)
	reg := harness.StartRegistry(t)
	pause := harness.PauseBinary(t)
	ctr := harness.StartContainerd(t, harness.WithInsecureRegistry(reg), harness.WithSandboxImage(harness.PauseImage(t, reg, pause)))
	image := reg + "/shop/unsigned:v1"
	harness.PushRunnableImage(t, image, pause)
	k.Namespace("shop")
	harness.NewPods(t, ctr, k, node).RunPod(t.Context(), image, "shop", "web")

	// The agent on the shipped config of base+quarantine+monitoring, with
	// the install's ServiceAccount token and the test's runtime, ports and
	// state directory.
	path := mountConfig(t, render(t, "kubernetes/all"), map[string][]byte{"ci.pub": newKey(t)})
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	k.WriteKubeconfig(kubeconfig, k.Token("pinwarden-system", "pinwarden"))
	metricsAddr, statusAddr := harness.FreeAddr(t), harness.FreeAddr(t)
	cfg["runtimeEndpoint"] = ctr.Endpoint()
	cfg["stateDir"] = t.TempDir()
	cfg["nodeName"] = node
	cfg["metricsAddress"], cfg["statusAddress"] = metricsAddr, statusAddr
	cfg["registries"] = map[string]any{"insecure": []string{reg}}
	kube := cfg["kubernetes"].(map[string]any)
	kube["kubeconfig"] = kubeconfig
	if b, err = yaml.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	bin, err := harness.AgentBinary(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	agent := harness.StartAgent(t, bin, path, metricsAddr, statusAddr)

	client := k.Client()
	harness.Eventually(t, 60*time.Second, "condition, taint and event on the node", func() (bool, string) {
		n, err := client.CoreV1().Nodes().Get(context.Background(), node, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		var cond, taint bool
		for _, c := range n.Status.Conditions {
			cond = cond || (c.Type == "UntrustedImage" && c.Status == corev1.ConditionTrue)
		}
		for _, tn := range n.Spec.Taints {
			taint = taint || tn.Key == "pinwarden.dev/untrusted-image"
		}
		evs, err := client.CoreV1().Events("").List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + node})
		if err != nil {
			return false, err.Error()
		}
		return cond && taint && len(evs.Items) > 0, "condition " + boolStr(cond) + ", taint " + boolStr(taint)
	})
	if log := agent.Log(); strings.Contains(strings.ToLower(log), "forbidden") {
		t.Errorf("the agent was refused by RBAC:\n%s", log)
	}
}

func boolStr(b bool) string {
	if b {
		return "set"
	}
	return "missing"
}
