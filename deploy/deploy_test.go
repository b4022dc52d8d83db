package deploy

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/sigstore/sigstore-go/pkg/testing/ca"
	"github.com/sigstore/sigstore/pkg/cryptoutils"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/pinwarden/pinwarden/agent"
	"github.com/pinwarden/pinwarden/deploy/internal/gen"
	"github.com/pinwarden/pinwarden/test/harness"
)

// kustomizations are every directory a user applies with kubectl apply -k.
var kustomizations = []string{"kubernetes", "kubernetes/quarantine", "kubernetes/monitoring", "kubernetes/examples", "kubernetes/all"}

// object is one rendered manifest.
type object struct {
	Kind, Name, Namespace string
	YAML                  []byte
}

// render builds a kustomization with the kustomize library, as kubectl
// apply -k does.
func render(t *testing.T, dir string) []object {
	t.Helper()
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize %s: %v", dir, err)
	}
	var out []object
	for _, r := range m.Resources() {
		b, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, object{Kind: r.GetKind(), Name: r.GetName(), Namespace: r.GetNamespace(), YAML: b})
	}
	return out
}

// find decodes the one object of kind and name into v.
func find(t *testing.T, objs []object, kind, name string, v any) {
	t.Helper()
	for _, o := range objs {
		if o.Kind == kind && o.Name == name {
			if err := yaml.Unmarshal(o.YAML, v); err != nil {
				t.Fatalf("%s/%s: %v", kind, name, err)
			}
			return
		}
	}
	t.Fatalf("no %s/%s rendered", kind, name)
}

func kinds(objs []object) []string {
	var ks []string
	for _, o := range objs {
		ks = append(ks, o.Kind+"/"+o.Name)
	}
	slices.Sort(ks)
	return ks
}

// TestKustomizations renders every kustomization and checks what each one
// adds to the base.
func TestKustomizations(t *testing.T) {
	base := []string{"ClusterRole/pinwarden", "ClusterRoleBinding/pinwarden", "ConfigMap/pinwarden",
		"DaemonSet/pinwarden", "Namespace/pinwarden-system", "ServiceAccount/pinwarden"}
	quarantine := []string{"ClusterRole/pinwarden-quarantine", "ClusterRoleBinding/pinwarden-quarantine"}
	monitoring := []string{"NetworkPolicy/pinwarden-metrics", "PrometheusRule/pinwarden", "Role/prometheus-k8s",
		"RoleBinding/prometheus-k8s", "Service/pinwarden", "ServiceMonitor/pinwarden"}
	want := map[string][]string{
		"kubernetes":            base,
		"kubernetes/quarantine": slices.Concat(base, quarantine),
		"kubernetes/monitoring": slices.Concat(base, monitoring),
		"kubernetes/examples":   base,
		"kubernetes/all":        slices.Concat(base, quarantine, monitoring),
	}
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			objs := render(t, dir)
			w := slices.Clone(want[dir])
			slices.Sort(w)
			if got := kinds(objs); !slices.Equal(got, w) {
				t.Errorf("objects = %v\nwant %v", got, w)
			}
			for _, o := range objs {
				if o.Kind != "Namespace" && !strings.HasPrefix(o.Kind, "Cluster") && o.Namespace != "pinwarden-system" {
					t.Errorf("%s/%s is in namespace %q, want pinwarden-system", o.Kind, o.Name, o.Namespace)
				}
			}
		})
	}
}

// TestKubectlKustomize: the kubectl users run renders the same objects as
// the library (kubectl embeds its own kustomize).
func TestKubectlKustomize(t *testing.T) {
	kubectl := harness.RequireBinary(t, "kubectl")
	for _, dir := range kustomizations {
		out, err := exec.Command(kubectl, "kustomize", dir).CombinedOutput()
		if err != nil {
			t.Errorf("kubectl kustomize %s: %v\n%s", dir, err, out)
			continue
		}
		var got []string
		for _, doc := range strings.Split(string(out), "\n---\n") {
			var o struct {
				Kind     string `json:"kind"`
				Metadata struct {
					Name string `json:"name"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
				t.Fatal(err)
			}
			got = append(got, o.Kind+"/"+o.Metadata.Name)
		}
		slices.Sort(got)
		if want := kinds(render(t, dir)); !slices.Equal(got, want) {
			t.Errorf("kubectl kustomize %s = %v, library = %v", dir, got, want)
		}
	}
}

type rule struct{ group, resource, verb string }

func rules(t *testing.T, objs []object) []rule {
	t.Helper()
	var out []rule
	for _, o := range objs {
		if o.Kind != "ClusterRole" {
			continue
		}
		var cr rbacv1.ClusterRole
		find(t, objs, o.Kind, o.Name, &cr)
		for _, r := range cr.Rules {
			for _, g := range r.APIGroups {
				for _, res := range r.Resources {
					for _, v := range r.Verbs {
						out = append(out, rule{g, res, v})
					}
				}
			}
		}
	}
	sortRules(out)
	return out
}

// sortRules sorts rules by resource, then verb, as rules returns them.
func sortRules(rs []rule) {
	slices.SortFunc(rs, func(a, b rule) int {
		if c := strings.Compare(a.resource, b.resource); c != 0 {
			return c
		}
		return strings.Compare(a.verb, b.verb)
	})
}

// TestRBACIsLeastPrivilege pins the ClusterRoles to the CONTRACT: get nodes,
// patch nodes/status, create/patch core events; `patch nodes` only with the
// quarantine overlay; nothing of events.k8s.io.
func TestRBACIsLeastPrivilege(t *testing.T) {
	base := []rule{{"", "events", "create"}, {"", "events", "patch"}, {"", "nodes", "get"}, {"", "nodes/status", "patch"}}
	withTaint := []rule{{"", "events", "create"}, {"", "events", "patch"}, {"", "nodes", "get"}, {"", "nodes", "patch"}, {"", "nodes/status", "patch"}}
	for dir, want := range map[string][]rule{"kubernetes": base, "kubernetes/monitoring": base, "kubernetes/examples": base,
		"kubernetes/quarantine": withTaint, "kubernetes/all": withTaint} {
		if got := rules(t, render(t, dir)); !slices.Equal(got, want) {
			t.Errorf("%s: ClusterRole rules = %v, want %v", dir, got, want)
		}
	}
	var crb rbacv1.ClusterRoleBinding
	find(t, render(t, "kubernetes/quarantine"), "ClusterRoleBinding", "pinwarden-quarantine", &crb)
	if len(crb.Subjects) != 1 || crb.Subjects[0].Name != "pinwarden" || crb.Subjects[0].Namespace != "pinwarden-system" {
		t.Errorf("quarantine binding subjects = %+v", crb.Subjects)
	}
}

// TestGuardComponentAddsListNodes: `list nodes` comes only with the guard
// component (the contract's RBAC), composed with the quarantine as its
// kustomization comment says.
func TestGuardComponentAddsListNodes(t *testing.T) {
	want := []rule{{"", "events", "create"}, {"", "events", "patch"}, {"", "nodes", "get"}, {"", "nodes", "list"}, {"", "nodes", "patch"}, {"", "nodes/status", "patch"}}
	if got := rules(t, renderComponents(t, "quarantine", "guard")); !slices.Equal(got, want) {
		t.Errorf("base + quarantine + guard: ClusterRole rules = %v, want %v", got, want)
	}
}

// TestNamespacePodSecurity: hostPath volumes need the privileged level.
func TestNamespacePodSecurity(t *testing.T) {
	var ns corev1.Namespace
	find(t, render(t, "kubernetes"), "Namespace", "pinwarden-system", &ns)
	if ns.Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Errorf("namespace labels = %v", ns.Labels)
	}
	b, err := os.ReadFile("kubernetes/base/namespace.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte("hostPath")) {
		t.Error("namespace.yaml does not say why it is privileged")
	}
}

var digestRef = regexp.MustCompile(`^[a-z0-9.\-/:]+@sha256:[0-9a-f]{64}$`)

// TestDaemonSetPosture checks the DaemonSet as rendered: hardening of
// THREATS.md, the runtime's directory, probes and sizing.
func TestDaemonSetPosture(t *testing.T) {
	var ds appsv1.DaemonSet
	find(t, render(t, "kubernetes"), "DaemonSet", "pinwarden", &ds)
	spec := ds.Spec.Template.Spec
	if len(spec.Containers) != 1 {
		t.Fatalf("containers = %d", len(spec.Containers))
	}
	c := spec.Containers[0]
	check := func(ok bool, format string, args ...any) {
		t.Helper()
		if !ok {
			t.Errorf(format, args...)
		}
	}
	check(digestRef.MatchString(c.Image), "image %q is not pinned by digest", c.Image)
	check(spec.PriorityClassName == "system-node-critical", "priorityClassName = %q", spec.PriorityClassName)
	check(len(spec.Tolerations) == 1 && spec.Tolerations[0].Operator == corev1.TolerationOpExists && spec.Tolerations[0].Key == "" &&
		spec.Tolerations[0].Effect == "", "tolerations %+v do not tolerate every taint", spec.Tolerations)
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	check(ds.Spec.UpdateStrategy.Type == appsv1.RollingUpdateDaemonSetStrategyType && ru != nil && ru.MaxUnavailable != nil,
		"update strategy %+v has no rolling maxUnavailable", ds.Spec.UpdateStrategy)
	check(spec.SecurityContext != nil && spec.SecurityContext.SeccompProfile != nil &&
		spec.SecurityContext.SeccompProfile.Type == corev1.SeccompProfileTypeRuntimeDefault, "pod seccomp is not RuntimeDefault")
	check(spec.ServiceAccountName == "pinwarden", "serviceAccountName = %q", spec.ServiceAccountName)
	check(!spec.HostNetwork && !spec.HostPID && !spec.HostIPC, "host namespaces shared")

	sc := c.SecurityContext
	if sc == nil {
		t.Fatal("no container securityContext")
	}
	check(sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem, "root filesystem is writable")
	check(sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation, "privilege escalation allowed")
	check(sc.Privileged == nil || !*sc.Privileged, "privileged")
	check(sc.Capabilities != nil && slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) && len(sc.Capabilities.Add) == 0,
		"capabilities %+v: want drop ALL, add none", sc.Capabilities)

	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	rt, ok := mounts["/run/containerd"]
	check(ok && rt.SubPath == "", "/run/containerd not mounted as a directory")
	if hp := volumes[rt.Name].HostPath; hp == nil || hp.Path != "/run/containerd" || hp.Type == nil || *hp.Type != corev1.HostPathDirectory {
		t.Errorf("runtime volume = %+v, want hostPath directory /run/containerd", volumes[rt.Name])
	}
	for _, v := range spec.Volumes {
		check(v.HostPath == nil || !strings.HasSuffix(v.HostPath.Path, ".sock"), "volume %s mounts a socket file", v.Name)
	}
	if hp := volumes[mounts["/var/lib/pinwarden"].Name].HostPath; hp == nil || hp.Path != "/var/lib/pinwarden" {
		t.Error("state is not in hostPath /var/lib/pinwarden")
	}
	hosts, ok := mounts["/etc/containerd/certs.d"]
	check(ok && hosts.ReadOnly, "containerd's hosts dir /etc/containerd/certs.d is not mounted read-only")
	if hp := volumes[hosts.Name].HostPath; hp == nil || hp.Path != "/etc/containerd/certs.d" {
		t.Errorf("hosts volume = %+v, want hostPath /etc/containerd/certs.d", volumes[hosts.Name])
	}

	check(c.ReadinessProbe != nil && c.ReadinessProbe.HTTPGet != nil && c.ReadinessProbe.HTTPGet.Path == "/readyz", "readiness probe is not /readyz")
	check(c.LivenessProbe != nil && c.LivenessProbe.HTTPGet != nil && c.LivenessProbe.HTTPGet.Path == "/healthz", "liveness probe is not /healthz")

	limit, request := c.Resources.Limits[corev1.ResourceMemory], c.Resources.Requests[corev1.ResourceMemory]
	check(!limit.IsZero() && !request.IsZero() && !c.Resources.Requests.Cpu().IsZero(), "resources %+v lack memory limit or requests", c.Resources)
	var gomemlimit string
	for _, e := range c.Env {
		if e.Name == "GOMEMLIMIT" {
			gomemlimit = e.Value
		}
	}
	// GOMEMLIMIT uses Go's suffixes (MiB), Kubernetes uses Mi.
	gml, err := resource.ParseQuantity(strings.TrimSuffix(gomemlimit, "B"))
	if err != nil {
		t.Fatalf("GOMEMLIMIT %q: %v", gomemlimit, err)
	}
	// The binary's own file pages (~35 MiB, bench/RESULTS.md) count against the
	// limit but not against GOMEMLIMIT.
	headroom := resource.MustParse("32Mi")
	check(gml.Value() <= limit.Value()-headroom.Value() && gml.Value() >= request.Value(),
		"GOMEMLIMIT %s must sit between the request %s and the limit %s minus %s", gomemlimit, &request, &limit, &headroom)
}

// newKey writes an ECDSA P-256 public key PEM, as `cosign generate-key-pair`
// makes.
func newKey(t *testing.T) []byte {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pem, err := cryptoutils.MarshalPublicKeyToPEM(priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	return pem
}

// newTrustedRoot is a sigstore trusted_root.json of an offline sigstore.
func newTrustedRoot(t *testing.T) []byte {
	t.Helper()
	vs, err := ca.NewVirtualSigstore()
	if err != nil {
		t.Fatal(err)
	}
	return harness.TrustedRootJSON(t, vs)
}

// mountConfig lays out the DaemonSet's projected config volume under a temp
// dir: the ConfigMap's keys and the Secret's keys, as the kubelet would.
// It returns the path of the --config argument inside that dir.
func mountConfig(t *testing.T, objs []object, secret map[string][]byte) string {
	t.Helper()
	var ds appsv1.DaemonSet
	find(t, objs, "DaemonSet", "pinwarden", &ds)
	c := ds.Spec.Template.Spec.Containers[0]
	i := slices.Index(c.Args, "--config")
	if i < 0 || i+1 >= len(c.Args) {
		t.Fatalf("args %v name no --config", c.Args)
	}
	configPath := c.Args[i+1]
	var vol *corev1.Volume
	var mountPath string
	for _, m := range c.VolumeMounts {
		if strings.HasPrefix(configPath, m.MountPath+"/") {
			mountPath = m.MountPath
			for _, v := range ds.Spec.Template.Spec.Volumes {
				if v.Name == m.Name {
					vol = &v
				}
			}
		}
	}
	if vol == nil || vol.Projected == nil {
		t.Fatalf("--config %s is not on the projected config volume", configPath)
	}
	dir := t.TempDir()
	write := func(name string, b []byte) {
		t.Helper()
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			t.Fatalf("projected volume: %s comes from two sources", name)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o444); err != nil {
			t.Fatal(err)
		}
	}
	var sawSecret bool
	for _, src := range vol.Projected.Sources {
		switch {
		case src.ConfigMap != nil:
			var cm corev1.ConfigMap
			find(t, objs, "ConfigMap", src.ConfigMap.Name, &cm)
			for k, v := range cm.Data {
				write(k, []byte(v))
			}
		case src.Secret != nil:
			sawSecret = true
			if src.Secret.Name != "pinwarden-keys" || src.Secret.Optional == nil || !*src.Secret.Optional || len(src.Secret.Items) != 0 {
				t.Fatalf("secret source %+v: want the whole of pinwarden-keys, optional", src.Secret)
			}
			for k, v := range secret {
				write(k, v)
			}
		}
	}
	if !sawSecret {
		t.Fatal("the config volume does not project the Secret pinwarden-keys")
	}
	return filepath.Join(dir, strings.TrimPrefix(configPath, mountPath+"/"))
}

// TestShippedConfigLoads loads the config of every kustomization with the
// files the DaemonSet mounts (the ConfigMap, plus the Secret the README's
// quick start creates) through the agent's own loader: strict parsing,
// key files, trusted root, policies and pins.
func TestShippedConfigLoads(t *testing.T) {
	key, trustedRoot := newKey(t), newTrustedRoot(t)
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			objs := render(t, dir)
			secret := map[string][]byte{"ci.pub": key} // README: --from-file=ci.pub=cosign.pub
			if dir == "kubernetes/examples" {
				secret["trusted_root.json"] = trustedRoot
			}
			// Its config has the lines the registries components set, so
			// they combine with it.
			var cm corev1.ConfigMap
			find(t, objs, "ConfigMap", "pinwarden", &cm)
			wantConfig(t, cm.Data["config.yaml"], "pullsecrets", "credential-provider")
			s, err := agent.LoadSettings(mountConfig(t, objs, secret))
			if err != nil {
				t.Fatalf("shipped config does not load: %v", err)
			}
			wantTaint := strings.Contains(dir, "quarantine") || dir == "kubernetes/all"
			if s.Config.Kubernetes.QuarantineTaint != wantTaint {
				t.Errorf("quarantineTaint = %v, want %v", s.Config.Kubernetes.QuarantineTaint, wantTaint)
			}
			if s.Config.Registries.PodPullSecrets {
				t.Errorf("registries.podPullSecrets is on without components/pullsecrets")
			}
			if r := s.Config.Registries; r.CredentialProviderConfig != "" || r.CredentialProviderBinDir != "" {
				t.Errorf("registries.credentialProvider* set without components/credential-provider: %+v", r)
			}
			if !s.Config.Kubernetes.Enabled || s.Config.MetricsAddress != ":9842" {
				t.Errorf("kubernetes.enabled = %v, metricsAddress = %q", s.Config.Kubernetes.Enabled, s.Config.MetricsAddress)
			}
		})
	}
}

// TestQuarantineKeepsTheBaseConfig: the quarantine overlay changes exactly
// one key of the base's config, so edits of base/config.yaml carry over.
func TestQuarantineKeepsTheBaseConfig(t *testing.T) {
	cfg := func(dir string) string {
		var cm corev1.ConfigMap
		find(t, render(t, dir), "ConfigMap", "pinwarden", &cm)
		return cm.Data["config.yaml"]
	}
	base, q := cfg("kubernetes"), cfg("kubernetes/quarantine")
	if want := strings.Replace(base, "quarantineTaint: false", "quarantineTaint: true", 1); strings.TrimSpace(q) != strings.TrimSpace(want) {
		t.Errorf("quarantine config:\n%s\nwant the base config with quarantineTaint: true:\n%s", q, want)
	}
}

// TestMonitoring checks the Service, the ServiceMonitor's node label and the
// NetworkPolicy of the monitoring overlay.
func TestMonitoring(t *testing.T) {
	objs := render(t, "kubernetes/monitoring")
	var ds appsv1.DaemonSet
	find(t, objs, "DaemonSet", "pinwarden", &ds)
	podLabels := ds.Spec.Template.Labels

	var svc corev1.Service
	find(t, objs, "Service", "pinwarden", &svc)
	for k, v := range svc.Spec.Selector {
		if podLabels[k] != v {
			t.Errorf("Service selector %s=%s does not select the agent's pods (%v)", k, v, podLabels)
		}
	}
	if !svc.Spec.PublishNotReadyAddresses {
		t.Error("Service hides NotReady agents from Prometheus (their runtime_up == 0 would never alert)")
	}

	var sm struct {
		Spec struct {
			JobLabel string `json:"jobLabel"`
			Selector struct {
				MatchLabels map[string]string `json:"matchLabels"`
			} `json:"selector"`
			Endpoints []struct {
				Port        string `json:"port"`
				Interval    string `json:"interval"`
				Relabelings []struct {
					Action       string   `json:"action"`
					SourceLabels []string `json:"sourceLabels"`
					TargetLabel  string   `json:"targetLabel"`
				} `json:"relabelings"`
			} `json:"endpoints"`
		} `json:"spec"`
	}
	find(t, objs, "ServiceMonitor", "pinwarden", &sm)
	if svc.Labels[sm.Spec.JobLabel] != "pinwarden" {
		t.Errorf("ServiceMonitor jobLabel %q gives job=%q, the alerts want job=\"pinwarden\"", sm.Spec.JobLabel, svc.Labels[sm.Spec.JobLabel])
	}
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != svc.Spec.Ports[0].Name {
		t.Fatalf("ServiceMonitor endpoints %+v do not scrape the Service's port %q", sm.Spec.Endpoints, svc.Spec.Ports[0].Name)
	}
	var nodeLabel bool
	for _, r := range sm.Spec.Endpoints[0].Relabelings {
		nodeLabel = nodeLabel || (r.TargetLabel == "node" && slices.Equal(r.SourceLabels, []string{"__meta_kubernetes_pod_node_name"}))
	}
	if !nodeLabel {
		t.Error("ServiceMonitor does not relabel the pod's node name into `node`")
	}

	var rb rbacv1.RoleBinding
	find(t, objs, "RoleBinding", "prometheus-k8s", &rb)
	if len(rb.Subjects) != 1 || rb.Subjects[0].Namespace != "monitoring" || rb.Subjects[0].Name != "prometheus-k8s" {
		t.Errorf("RoleBinding prometheus-k8s subjects = %+v, want kube-prometheus' monitoring/prometheus-k8s", rb.Subjects)
	}

	var np networkingv1.NetworkPolicy
	find(t, objs, "NetworkPolicy", "pinwarden-metrics", &np)
	for k, v := range np.Spec.PodSelector.MatchLabels {
		if podLabels[k] != v {
			t.Errorf("NetworkPolicy does not select the agent's pods")
		}
	}
	if !slices.Equal(np.Spec.PolicyTypes, []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}) || len(np.Spec.Ingress) != 1 ||
		len(np.Spec.Ingress[0].From) != 1 || np.Spec.Ingress[0].From[0].NamespaceSelector == nil ||
		np.Spec.Ingress[0].From[0].NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"] != "monitoring" ||
		np.Spec.Ingress[0].From[0].PodSelector != nil || np.Spec.Ingress[0].From[0].IPBlock != nil {
		t.Errorf("NetworkPolicy %+v: want ingress from the monitoring namespace only", np.Spec)
	}
}

// TestGeneratedFilesAreCurrent: the PrometheusRule and the dashboard are
// what `go generate` makes from their sources.
func TestGeneratedFilesAreCurrent(t *testing.T) {
	files, err := gen.Files(".")
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range files {
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is stale: run `go generate ./...` in deploy/", path)
		}
	}
	// And the PrometheusRule carries the very rules of alerts.yaml.
	var rule struct {
		Spec struct {
			Groups []any `json:"groups"`
		} `json:"spec"`
	}
	var alerts struct {
		Groups []any `json:"groups"`
	}
	b, err := os.ReadFile(gen.AlertsPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &alerts); err != nil {
		t.Fatal(err)
	}
	find(t, render(t, "kubernetes/monitoring"), "PrometheusRule", "pinwarden", &rule)
	a, _ := yaml.Marshal(alerts.Groups)
	r, _ := yaml.Marshal(rule.Spec.Groups)
	if !bytes.Equal(a, r) || len(alerts.Groups) == 0 {
		t.Error("the rendered PrometheusRule's groups differ from prometheus/alerts.yaml")
	}
}
