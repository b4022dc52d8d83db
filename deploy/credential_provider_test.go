package deploy

import (
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/pinwarden/pinwarden/agent"
	"github.com/pinwarden/pinwarden/test/harness"
)

// credentialProviderCases are the credential provider components, each with
// the kubelet's paths on that cloud's nodes (docs/registries.md) and the
// other host files its plugin reads.
var credentialProviderCases = []struct {
	component, config, binDir string
	extra                     []string // host files mounted at the same path
}{
	{"credential-provider", "/etc/eks/image-credential-provider/config.json", "/etc/eks/image-credential-provider", nil},
	{"credential-provider-aks", "/var/lib/kubelet/credential-provider-config.yaml", "/var/lib/kubelet/credential-provider", []string{"/etc/kubernetes/azure.json"}},
	{"credential-provider-gke", "/etc/srv/kubernetes/cri_auth_config.yaml", "/home/kubernetes/bin", nil},
}

// credentialProviderCombos are the component lists each credential
// provider component is rendered with: alone, with the quarantine, and with
// the pull secrets and the quarantine, in both orders (each sets its own
// lines of the base's one registries block).
func credentialProviderCombos(component string) [][]string {
	return [][]string{
		{component},
		{component, "quarantine"},
		{component, "pullsecrets", "quarantine"},
		{"quarantine", "pullsecrets", component},
	}
}

// TestCredentialProviderComponents renders the base with each credential
// provider component, alone and with the quarantine and pull secrets
// components: the kubelet's config file and plugin dir (and the plugin's
// own files) are mounted read-only from the node's paths, the config's
// registries keys name those mounts in the base's one registries block,
// the rest of the base's config is kept, the pod stays off the host
// network, and the config loads and runs a real plugin exchange with the
// node's files laid out where the mounts put them.
func TestCredentialProviderComponents(t *testing.T) {
	const regHost = "registry.example.com"
	node := harness.WriteNodeCredentials(t, regHost, "node-user", "n0de-s3cret")
	var baseCM corev1.ConfigMap
	find(t, render(t, "kubernetes"), "ConfigMap", "pinwarden", &baseCM)
	for _, tc := range credentialProviderCases {
		for _, components := range credentialProviderCombos(tc.component) {
			withQuarantine, withPullSecrets := slices.Contains(components, "quarantine"), slices.Contains(components, "pullsecrets")
			t.Run(strings.Join(components, "+"), func(t *testing.T) {
				objs := render(t, withComponents(t, components...))
				var ds appsv1.DaemonSet
				find(t, objs, "DaemonSet", "pinwarden", &ds)
				spec := ds.Spec.Template.Spec
				if spec.HostNetwork {
					t.Error("the component turns on hostNetwork; that is the user's call (docs/registries.md)")
				}
				volumes := map[string]corev1.Volume{}
				for _, v := range spec.Volumes {
					volumes[v.Name] = v
				}
				mounts := map[string]corev1.VolumeMount{}
				for _, m := range spec.Containers[0].VolumeMounts {
					mounts[m.MountPath] = m
				}
				// hostPathAt checks that path in the container is a read-only
				// mount of hostPath of the given type.
				hostPathAt := func(path, hostPath string, typ corev1.HostPathType) {
					t.Helper()
					m, ok := mounts[path]
					if !ok {
						t.Errorf("nothing mounted at %s", path)
						return
					}
					if !m.ReadOnly || m.SubPath != "" {
						t.Errorf("mount %s: readOnly %v, subPath %q; want read-only, whole volume", path, m.ReadOnly, m.SubPath)
					}
					hp := volumes[m.Name].HostPath
					if hp == nil || hp.Path != hostPath || hp.Type == nil || *hp.Type != typ {
						t.Errorf("volume at %s = %+v, want hostPath %s of type %s", path, volumes[m.Name], hostPath, typ)
					}
				}

				for _, o := range objs {
					if strings.HasSuffix(o.Name, "-values") {
						t.Errorf("a replacement's source %s/%s was rendered", o.Kind, o.Name)
					}
				}
				var cm corev1.ConfigMap
				find(t, objs, "ConfigMap", "pinwarden", &cm)
				if got, want := cm.Data["config.yaml"], wantConfig(t, baseCM.Data["config.yaml"], components...); strings.TrimSpace(got) != strings.TrimSpace(want) {
					t.Errorf("config.yaml:\n%s\nwant the base config with only the components' lines set:\n%s", got, want)
				}

				// Lay the node's files out where the mounts put them: the
				// rendered config names in-container paths, rewritten here
				// to the test's plugin config and dir.
				path := mountConfig(t, objs, map[string][]byte{"ci.pub": newKey(t)})
				s, err := agent.LoadSettings(path)
				if err == nil || !strings.Contains(err.Error(), "credentialProvider") {
					t.Errorf("the config loaded without the node's files mounted (err %v): the keys are not set", err)
				}
				b, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				const cfgMount, binMount = "/etc/kubelet-credential-provider/config", "/etc/kubelet-credential-provider/bin"
				hostPathAt(cfgMount, tc.config, corev1.HostPathFile)
				hostPathAt(binMount, tc.binDir, corev1.HostPathDirectory)
				for _, p := range tc.extra {
					hostPathAt(p, p, corev1.HostPathFile)
				}
				text := strings.NewReplacer(cfgMount, node.ProviderConfig, binMount, node.ProviderBinDir).Replace(string(b))
				if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
					t.Fatal(err)
				}
				if s, err = agent.LoadSettings(path); err != nil {
					t.Fatalf("config with the node's files in place does not load: %v", err)
				}
				if r := s.Config.Registries; r.CredentialProviderConfig != node.ProviderConfig || r.CredentialProviderBinDir != node.ProviderBinDir {
					t.Fatalf("registries = %+v", r)
				}
				if s.Config.Kubernetes.QuarantineTaint != withQuarantine || s.Config.Registries.PodPullSecrets != withPullSecrets {
					t.Errorf("quarantineTaint = %v, want %v; podPullSecrets = %v, want %v",
						s.Config.Kubernetes.QuarantineTaint, withQuarantine, s.Config.Registries.PodPullSecrets, withPullSecrets)
				}
				v, err := agent.NewVerifier(s.Config, slog.New(slog.DiscardHandler))
				if err != nil {
					t.Fatal(err)
				}
				if ac, ok := v.Credentials(regHost); !ok || ac.Username != "node-user" {
					t.Errorf("no credentials for %s from the plugin through the rendered config (%v, %q)", regHost, ok, ac.Username)
				}
			})
		}
	}
}

// TestCredentialProviderKubectlKustomize: kubectl's own kustomize renders
// the same config.yaml as the library (checked above) for each credential
// provider component with the pull secrets and quarantine components, and
// drops the replacements' sources too.
func TestCredentialProviderKubectlKustomize(t *testing.T) {
	kubectl := harness.RequireBinary(t, "kubectl")
	for _, tc := range credentialProviderCases {
		for _, components := range credentialProviderCombos(tc.component)[2:] {
			name := strings.Join(components, "+")
			dir := withComponents(t, components...)
			out, err := exec.Command(kubectl, "kustomize", dir).CombinedOutput()
			if err != nil {
				t.Fatalf("kubectl kustomize %s: %v\n%s", name, err, out)
			}
			var lib corev1.ConfigMap
			find(t, render(t, dir), "ConfigMap", "pinwarden", &lib)
			found := false
			for _, doc := range strings.Split(string(out), "\n---\n") {
				var cm corev1.ConfigMap
				if err := yaml.Unmarshal([]byte(doc), &cm); err != nil {
					t.Fatal(err)
				}
				if strings.HasSuffix(cm.Name, "-values") {
					t.Errorf("kubectl kustomize %s rendered the replacement's source %s/%s", name, cm.Kind, cm.Name)
				}
				if cm.Kind != "ConfigMap" || cm.Name != "pinwarden" {
					continue
				}
				found = true
				if got, want := cm.Data["config.yaml"], lib.Data["config.yaml"]; got != want {
					t.Errorf("kubectl kustomize %s: config.yaml =\n%s\nlibrary:\n%s", name, got, want)
				}
			}
			if !found {
				t.Errorf("kubectl kustomize %s rendered no ConfigMap/pinwarden:\n%s", name, out)
			}
		}
	}
}
