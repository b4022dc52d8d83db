package harness_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// The control plane enforces RBAC: a ServiceAccount token from the
// TokenRequest API authenticates, and is forbidden what no role grants it
// until a role is applied.
func TestKube(t *testing.T) {
	t.Parallel()
	k := harness.StartKube(t)
	k.Namespace("rbac-test")
	k.ServiceAccount("rbac-test", "reader")
	k.Node("node-a")
	kubeconfig := t.TempDir() + "/kubeconfig"
	k.WriteKubeconfig(kubeconfig, k.Token("rbac-test", "reader"))
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	sa, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if _, err := sa.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{}); err == nil || !strings.Contains(err.Error(), "forbidden") {
		t.Fatalf("get node without a role: %v, want forbidden", err)
	}
	k.Apply([]byte(`apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: node-reader}
rules: [{apiGroups: [""], resources: [nodes], verbs: [get]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: node-reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: node-reader}
subjects: [{kind: ServiceAccount, name: reader, namespace: rbac-test}]
`))
	harness.Eventually(t, 30*time.Second, "role effective", func() (bool, string) {
		_, err := sa.CoreV1().Nodes().Get(ctx, "node-a", metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	})
}

// Real pods run on both containerd lines: the sandbox from the local pause
// image, a container with the kubelet's labels, running until stopped.
func TestPods(t *testing.T) {
	t.Parallel()
	pause := harness.PauseBinary(t)
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			t.Parallel()
			reg := harness.StartRegistry(t)
			sandbox := harness.PauseImage(t, reg, pause)
			c := harness.StartContainerd(t, harness.WithFlavour(f), harness.WithInsecureRegistry(reg), harness.WithSandboxImage(sandbox))
			pods := harness.NewPods(t, c, nil, "node-a")
			ref := reg + "/app/web:v1"
			harness.PushRunnableImage(t, ref, pause)
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			defer cancel()
			pod := pods.RunPod(ctx, ref, "shop", "web-0")

			client, err := cri.Dial(ctx, c.Endpoint(), "k8s.io")
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			running := func() []cri.Container {
				cs, err := client.ListContainers(ctx)
				if err != nil {
					t.Fatal(err)
				}
				return cs
			}
			cs := running()
			if len(cs) != 1 || cs[0].ID != pod.ContainerID || cs[0].PodNamespace != "shop" || cs[0].PodName != "web-0" || cs[0].Name != "main" {
				t.Fatalf("running containers = %+v, want %s", cs, pod)
			}
			pods.StopPod(ctx, pod)
			harness.Eventually(t, 30*time.Second, "container exited", func() (bool, string) {
				cs := running()
				return len(cs) == 0, strings.Repeat("running ", len(cs))
			})
		})
	}
}
