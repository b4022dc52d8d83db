package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pinwarden/pinwarden/agent/report"
	"github.com/pinwarden/pinwarden/test/harness"
)

// TestContainerStartToCondition measures how long a container with an
// unsigned image takes to turn the node condition UntrustedImage True on a
// real kube-apiserver, from CRI reporting the container running (RunPod
// returns) to the condition read back from the API server (polled every
// 5 ms). The image is pulled and judged first, so the figure is the running
// path: containerd task event -> container relist -> loop -> reporter ->
// nodes/status patch. The container is stopped (and the condition False
// again) between rounds. containerd 2.x; the agent binary as deployed.
func TestContainerStartToCondition(t *testing.T) {
	gate(t)
	const rounds = 30
	pause := harness.PauseBinary(t)
	k := harness.StartKube(t)
	const node = "bench-node"
	k.Node(node)
	k.Namespace("shop")
	reg := harness.StartCountingRegistry(t)
	sandbox := harness.PauseImage(t, reg.Host, pause)
	ctr := harness.StartContainerd(t, harness.WithInsecureRegistry(reg.Host), harness.WithSandboxImage(sandbox))
	signer := harness.NewSigner(t)
	bad := reg.Host + "/shop/bad:v1"
	harness.PushRunnableImage(t, bad, pause)

	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	k.WriteAdminKubeconfig(kubeconfig)
	c := benchConfig(t, ctr.Endpoint(), dir, reg.Host+"/shop/**", signer.PubPath, reg.Host)
	c.NodeName = node
	c.Kubernetes.Enabled, c.Kubernetes.Kubeconfig = true, kubeconfig
	cfgPath := writeConfig(t, dir, c)
	a := harness.StartAgent(t, pinwardenBin(t), cfgPath, c.MetricsAddress, c.StatusAddress)

	pods := harness.NewPods(t, ctr, k, node)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	defer cancel()
	condition := func() corev1.ConditionStatus {
		n, err := k.Client().CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range n.Status.Conditions {
			if c.Type == report.ConditionType {
				return c.Status
			}
		}
		return ""
	}
	waitFor := func(want corev1.ConditionStatus, limit time.Duration) time.Duration {
		start := time.Now()
		for condition() != want {
			if time.Since(start) > limit {
				t.Fatalf("condition not %s after %v\n%s", want, limit, a.Log())
			}
			time.Sleep(5 * time.Millisecond)
		}
		return time.Since(start)
	}
	// Judge the image before any container runs.
	warm := pods.RunPod(ctx, bad, "shop", "warmup")
	waitFor(corev1.ConditionTrue, time.Minute)
	pods.StopPod(ctx, warm)
	waitFor(corev1.ConditionFalse, time.Minute)

	var up, down []time.Duration
	for i := range rounds {
		pod := pods.RunPod(ctx, bad, "shop", fmt.Sprintf("bad-%d", i))
		up = append(up, waitFor(corev1.ConditionTrue, 30*time.Second))
		pods.StopPod(ctx, pod)
		down = append(down, waitFor(corev1.ConditionFalse, 30*time.Second))
	}
	goal := 5 * time.Second
	record(t, fmt.Sprintf("container start -> condition True (real kube-apiserver, containerd %s), p50 / p99 of %d", ctr.Flavour().Name, rounds),
		ms(median(up))+" / "+ms(percentile(up, 99)), "<= 5 s", verdictMet(percentile(up, 99) <= goal))
	record(t, fmt.Sprintf("container stop -> condition False (same run), p50 / p99 of %d", rounds),
		ms(median(down))+" / "+ms(percentile(down, 99)), "<= 5 s", verdictMet(percentile(down, 99) <= goal))
}
