package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/report"
	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/test/harness"
)

// RBACManifests are the install's RBAC (ServiceAccount, ClusterRoles,
// bindings) of the base and of the quarantine overlay's component, relative to
// the repository root: the agent runs in these tests with exactly what they
// grant.
var RBACManifests = []string{"deploy/kubernetes/base/rbac.yaml", "deploy/kubernetes/components/quarantine/clusterrole.yaml"}

// The ServiceAccount the RBAC manifest creates and binds.
const (
	saNamespace = "pinwarden-system"
	saName      = "pinwarden"
)

func repoRoot(t *testing.T) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// kubeCluster is one real API server with the install's RBAC applied and a
// kubeconfig carrying the agent ServiceAccount's token.
type kubeCluster struct {
	*harness.Kube
	kubeconfig string
	roles      []string // ClusterRoles the manifest creates
}

func startCluster(t *testing.T) *kubeCluster {
	t.Helper()
	k := harness.StartKube(t)
	k.Namespace(saNamespace)
	var out string
	for _, m := range RBACManifests {
		manifest, err := os.ReadFile(filepath.Join(repoRoot(t), m))
		if err != nil {
			t.Fatalf("read the install's RBAC: %v", err)
		}
		out += k.Apply(manifest, "-n", saNamespace) // the base's kustomization sets this namespace
	}
	c := &kubeCluster{Kube: k, kubeconfig: filepath.Join(t.TempDir(), "kubeconfig")}
	for _, line := range strings.Split(out, "\n") {
		if name, ok := strings.CutPrefix(strings.Fields(line + " x")[0], "clusterrole.rbac.authorization.k8s.io/"); ok {
			c.roles = append(c.roles, name)
		}
	}
	if len(c.roles) == 0 {
		t.Fatalf("%v created no ClusterRole:\n%s", RBACManifests, out)
	}
	c.WriteKubeconfig(c.kubeconfig, k.Token(saNamespace, saName))
	return c
}

// events returns the events about kind/namespace/name with reason, and the
// sum of their counts (aggregation included).
func (c *kubeCluster) events(t *testing.T, kind, namespace, name, reason string) (evs []corev1.Event, count int) {
	t.Helper()
	ns := namespace
	if ns == "" {
		ns = metav1.NamespaceDefault // events about cluster-scoped objects
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	list, err := c.Client().CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: fields.Set{
		"involvedObject.kind": kind, "involvedObject.name": name, "reason": reason}.String()})
	if err != nil {
		t.Fatalf("list events: %v", err)
	}
	for _, ev := range list.Items {
		count += int(max(ev.Count, 1))
	}
	return list.Items, count
}

func (c *kubeCluster) node(t *testing.T, name string) *corev1.Node {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	n, err := c.Client().CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get node: %v", err)
	}
	return n
}

func untrustedCondition(n *corev1.Node) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == report.ConditionType {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

func tainted(n *corev1.Node) bool {
	return slices.ContainsFunc(n.Spec.Taints, func(t corev1.Taint) bool {
		return t.Key == report.TaintKey && t.Value == report.TaintValue && t.Effect == report.TaintEffect
	})
}

// The install's ClusterRole grants no more than the CONTRACT allows: no
// secrets, no writes to pods, no node deletes, no wildcards.
func checkRBACIsMinimal(t *testing.T, c *kubeCluster) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	for _, name := range c.roles {
		role, err := c.Client().RbacV1().ClusterRoles().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if role.AggregationRule != nil {
			t.Errorf("ClusterRole %s aggregates other roles", name)
		}
		for _, r := range role.Rules {
			all := append(append(append(slices.Clone(r.APIGroups), r.Resources...), r.Verbs...), r.ResourceNames...)
			if slices.ContainsFunc(all, func(s string) bool { return strings.Contains(s, "*") }) || len(r.NonResourceURLs) > 0 {
				t.Errorf("ClusterRole %s: wildcard or non-resource rule %+v", name, r)
			}
			for _, res := range r.Resources {
				switch {
				case res == "secrets":
					t.Errorf("ClusterRole %s grants %v on secrets", name, r.Verbs)
				case res == "pods" || strings.HasPrefix(res, "pods/"):
					if slices.ContainsFunc(r.Verbs, func(v string) bool { return v != "get" && v != "list" && v != "watch" }) {
						t.Errorf("ClusterRole %s writes %s: %v", name, res, r.Verbs)
					}
				case res == "nodes":
					if slices.ContainsFunc(r.Verbs, func(v string) bool { return v == "delete" || v == "deletecollection" || v == "create" || v == "update" }) {
						t.Errorf("ClusterRole %s: %v on nodes", name, r.Verbs)
					}
				}
			}
		}
	}
}

// kubeEnv is a node for the Kubernetes tests: env (containerd with the
// local pause image as sandbox image) plus a pod runner bound to the node.
type kubeEnv struct {
	*env
	pause string // the pause program
	pods  *harness.Pods
	node  string
}

func newKubeEnv(t *testing.T, c *kubeCluster, f harness.Flavour, pause, node string) *kubeEnv {
	t.Helper()
	reg := harness.StartCountingRegistry(t)
	sandbox := harness.PauseImage(t, reg.Host, pause)
	ctr := harness.StartContainerd(t, harness.WithFlavour(f), harness.WithInsecureRegistry(reg.Host), harness.WithSandboxImage(sandbox))
	e := &env{t: t, ctr: ctr, reg: reg, rt: harness.DialCRI(t, ctr), signer: harness.NewSigner(t), dir: t.TempDir()}
	c.Node(node)
	return &kubeEnv{env: e, pause: pause, pods: harness.NewPods(t, ctr, c.Kube, node), node: node}
}

// pushRunnable pushes a runnable image (unsigned, or signed by s) and
// returns its reference and digest.
func (k *kubeEnv) pushRunnable(repoTag string, s *harness.Signer) (ref, digest string) {
	k.t.Helper()
	ref = k.reg.Host + "/" + repoTag
	digest = harness.PushRunnableImage(k.t, ref, k.pause)
	if s != nil {
		s.Sign(k.t, ref[:strings.LastIndex(ref, ":")], digest)
	}
	return ref, digest
}

// withKubernetes makes c report on the env's node to the real API server
// through kubeconfig, with the quarantine taint on or off.
func (k *kubeEnv) withKubernetes(c *config.Config, kubeconfig string, taint bool) {
	c.NodeName = k.node
	c.Kubernetes = config.Kubernetes{Enabled: true, Kubeconfig: kubeconfig, Events: true, NodeCondition: true, QuarantineTaint: taint}
}

// The agent binary against a real API server, through the install's RBAC,
// with real running containers on both containerd lines: the condition and
// the taint follow a container with an unsigned image within 5 s of its start
// and stop; Warnings go to the Node and the Pod once, not again after a
// restart; quarantineTaint: false lifts the taint live; judging goes on while
// the API server is down and the node is reconciled when it is back.
func TestKubernetesOnRealAPIServer(t *testing.T) {
	pause := harness.PauseBinary(t)
	c := startCluster(t)
	t.Run("rbac is minimal", func(t *testing.T) { checkRBACIsMinimal(t, c) })
	t.Run("drain automation examples", func(t *testing.T) { checkExamples(t, c) })
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			node := "node-" + strings.ReplaceAll(f.Name, ".", "-")
			k := newKubeEnv(t, c, f, pause, node)
			shop := "shop-" + strings.ReplaceAll(f.Name, ".", "-")
			c.Namespace(shop)
			good, goodD := k.pushRunnable("shop/good:v1", k.signer)
			bad, badD := k.pushRunnable("shop/bad:v1", nil)
			cfg := k.newConfig(keyPolicy("shop", k.reg.Host+"/shop/**", k.signer),
				config.Policy{Name: "pause", Images: []string{k.reg.Host + "/pinwarden-test/pause"}, Ignore: true})
			k.withKubernetes(cfg, c.kubeconfig, true)
			k.writeConfig(cfg)
			a := k.startAgent(cfg)
			// Pulled and judged before any container starts: what is timed
			// below is the container start, not verification.
			k.pull(good)
			k.pull(bad)
			if im := a.WaitVerdict(badD, 15*time.Second); im.Verdict != "unverified" {
				t.Fatalf("shop/bad: %+v, want unverified", im)
			}
			a.WaitVerdict(goodD, 15*time.Second)

			conditionIs := func(what string, within time.Duration, want corev1.ConditionStatus, reason string, taint bool) {
				t.Helper()
				start := time.Now()
				harness.Eventually(t, within, what, func() (bool, string) {
					n := c.node(t, node)
					cond := untrustedCondition(n)
					if cond == nil {
						return false, "no condition"
					}
					return cond.Status == want && cond.Reason == reason && tainted(n) == taint,
						fmt.Sprintf("%s/%s %q, tainted=%v", cond.Status, cond.Reason, cond.Message, tainted(n))
				})
				t.Logf("%s after %v", what, time.Since(start).Round(time.Millisecond))
			}
			conditionIs("condition False at start", 15*time.Second, corev1.ConditionFalse, report.ReasonImagesTrusted, false)

			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
			defer cancel()
			k.pods.RunPod(ctx, good, shop, "good-0")
			bad0 := k.pods.RunPod(ctx, bad, shop, "bad-0")
			conditionIs("condition True and taint on, container start", 5*time.Second, corev1.ConditionTrue, report.ReasonUntrustedImageRunning, true)
			if msg := untrustedCondition(c.node(t, node)).Message; !strings.Contains(msg, "shop/bad:v1") || strings.Contains(msg, "shop/good") {
				t.Errorf("condition message %q, want shop/bad named and shop/good not", msg)
			}

			// Warnings on the Node and on the Pod, once each.
			short := status.ShortDigest(badD)
			harness.Eventually(t, 10*time.Second, "events on the node and the pod", func() (bool, string) {
				nodeEvs, n := c.events(t, "Node", "", node, verdict.EventImageUnverified)
				_, p := c.events(t, "Pod", shop, "bad-0", verdict.EventImageUnverified)
				return n == 1 && p == 1 && strings.Contains(nodeEvs[0].Message, short), fmt.Sprintf("node %d, pod %d", n, p)
			})
			if _, n := c.events(t, "Pod", shop, "good-0", verdict.EventImageUnverified); n != 0 {
				t.Errorf("%d Warnings on the pod running a verified image", n)
			}

			k.pods.StopPod(ctx, bad0)
			conditionIs("condition False and taint lifted, container stop", 5*time.Second, corev1.ConditionFalse, report.ReasonImagesTrusted, false)

			// The incident switch: quarantineTaint false, no restart.
			bad1 := k.pods.RunPod(ctx, bad, shop, "bad-1")
			conditionIs("quarantined again", 5*time.Second, corev1.ConditionTrue, report.ReasonUntrustedImageRunning, true)
			cfg.Kubernetes.QuarantineTaint = false
			k.writeConfig(cfg)
			conditionIs("taint lifted live by quarantineTaint: false", 5*time.Second, corev1.ConditionTrue, report.ReasonUntrustedImageRunning, false)
			if strings.Contains(a.Log(), "takes effect after a restart") {
				t.Errorf("a kubernetes.* change was logged as restart-only:\n%s", a.Log())
			}

			// A restart (a DaemonSet rollout) reports nothing again.
			noForbidden(t, a)
			stop(t, a)
			if b, err := os.ReadFile(filepath.Join(k.dir, "state", "reported.json")); err != nil {
				t.Errorf("the reported set was not kept: %v", err)
			} else {
				t.Logf("reported.json: %s", b)
			}
			a = k.startAgent(cfg)
			bad2 := k.pods.RunPod(ctx, bad, shop, "bad-2") // proof that the new agent reports
			harness.Eventually(t, 10*time.Second, "event on the pod started after the restart", func() (bool, string) {
				_, p := c.events(t, "Pod", shop, "bad-2", verdict.EventImageUnverified)
				return p == 1, fmt.Sprintf("%d", p)
			})
			for _, obj := range [][3]string{{"Node", "", node}, {"Pod", shop, "bad-0"}, {"Pod", shop, "bad-1"}} {
				if _, n := c.events(t, obj[0], obj[1], obj[2], verdict.EventImageUnverified); n != 1 {
					t.Errorf("%s %s/%s: %d ImageUnverified events after the restart, want 1", obj[0], obj[1], obj[2], n)
				}
			}

			// API server down: judging, metrics and status go on. (Right
			// after it restarts, RBAC's authorizer may refuse a request or
			// two until its caches fill: forbidden is checked before.)
			noForbidden(t, a)
			c.Stop()
			worse, worseD := k.pushRunnable("shop/worse:v1", nil)
			k.pull(worse)
			if im := a.WaitVerdict(worseD, 15*time.Second); im.Verdict != "unverified" {
				t.Errorf("judged with the API server down: %+v, want unverified", im)
			}
			k.pods.StopPod(ctx, bad1)
			k.pods.StopPod(ctx, bad2)
			c.Start()
			// Reconciled when it is back: the node condition is False again
			// and no event was sent twice.
			conditionIs("reconciled after the API server came back", 90*time.Second, corev1.ConditionFalse, report.ReasonImagesTrusted, false)
			harness.Eventually(t, 60*time.Second, "event for the image judged during the outage", func() (bool, string) {
				_, n := c.events(t, "Node", "", node, verdict.EventImageUnverified)
				return n == 2, fmt.Sprintf("%d node events", n)
			})
			for _, obj := range [][3]string{{"Pod", shop, "bad-0"}, {"Pod", shop, "bad-1"}, {"Pod", shop, "bad-2"}} {
				if _, n := c.events(t, obj[0], obj[1], obj[2], verdict.EventImageUnverified); n != 1 {
					t.Errorf("%s %s/%s: %d events after the outage, want 1", obj[0], obj[1], obj[2], n)
				}
			}
			stop(t, a)
		})
	}
}

// noForbidden fails the test when the API server refused the agent anything:
// the install's RBAC must be enough.
func noForbidden(t *testing.T, a *harness.Agent) {
	t.Helper()
	if log := a.Log(); strings.Contains(strings.ToLower(log), "forbidden") {
		t.Errorf("the agent was refused something by RBAC:\n%s", log)
	}
}
