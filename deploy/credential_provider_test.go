package deploy

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
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

// withComponents writes a kustomization of the base and components (names
// under kubernetes/components) to a new temp dir and returns the dir.
func withComponents(t *testing.T, components ...string) string {
	t.Helper()
	abs, err := filepath.Abs("kubernetes")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rel, err := filepath.Rel(dir, abs) // kustomize takes no absolute roots
	if err != nil {
		t.Fatal(err)
	}
	cs := make([]string, len(components))
	for i, c := range components {
		cs[i] = rel + "/components/" + c
	}
	k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [%s/base]\ncomponents: [%s]\n",
		rel, strings.Join(cs, ", "))
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestCredentialProviderComponents renders the base with each credential
// provider component, alone and with the quarantine: the kubelet's config
// file and plugin dir (and the plugin's own files) are mounted read-only
// from the node's paths, the config's registries keys name those mounts,
// the rest of the base's config is kept, the pod stays off the host
// network, and the config loads and runs a real plugin exchange with the
// node's files laid out where the mounts put them.
func TestCredentialProviderComponents(t *testing.T) {
	const regHost = "registry.example.com"
	node := harness.WriteNodeCredentials(t, regHost, "node-user", "n0de-s3cret")
	baseConfig := func(dir string) string {
		var cm corev1.ConfigMap
		find(t, render(t, dir), "ConfigMap", "pinwarden", &cm)
		return cm.Data["config.yaml"]
	}
	for _, tc := range credentialProviderCases {
		for _, withQuarantine := range []bool{false, true} {
			components, plain := []string{tc.component}, "kubernetes"
			if withQuarantine {
				components, plain = append(components, "quarantine"), "kubernetes/quarantine"
			}
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

				var cm corev1.ConfigMap
				find(t, objs, "ConfigMap", "pinwarden", &cm)
				cfg := cm.Data["config.yaml"]
				prefix := ds.Annotations["pinwarden.dev/registries-config"]
				if prefix == "" || !strings.HasPrefix(cfg, prefix+"\n") {
					t.Fatalf("config.yaml does not start with the annotation %q:\n%s", prefix, cfg)
				}
				if rest, want := strings.TrimPrefix(cfg, prefix+"\n"), baseConfig(plain); rest != want {
					t.Errorf("config.yaml after the prepended registries keys:\n%s\nwant the config of %s:\n%s", rest, plain, want)
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
				if s.Config.Kubernetes.QuarantineTaint != withQuarantine {
					t.Errorf("quarantineTaint = %v, want %v", s.Config.Kubernetes.QuarantineTaint, withQuarantine)
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

// TestCredentialProviderKubectlKustomize: kubectl's own kustomize prepends
// the registries keys too (a negative replacement index), with the
// quarantine's flip kept.
func TestCredentialProviderKubectlKustomize(t *testing.T) {
	kubectl := harness.RequireBinary(t, "kubectl")
	for _, tc := range credentialProviderCases {
		out, err := exec.Command(kubectl, "kustomize", withComponents(t, tc.component, "quarantine")).CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl kustomize %s: %v\n%s", tc.component, err, out)
		}
		found := false
		for _, doc := range strings.Split(string(out), "\n---\n") {
			var cm corev1.ConfigMap
			if err := yaml.Unmarshal([]byte(doc), &cm); err != nil {
				t.Fatal(err)
			}
			if cm.Kind != "ConfigMap" || cm.Name != "pinwarden" {
				continue
			}
			found = true
			c := cm.Data["config.yaml"]
			if !strings.HasPrefix(c, "registries:\n  credentialProviderConfig: /etc/kubelet-credential-provider/config\n") ||
				!strings.HasSuffix(strings.TrimSpace(c), "quarantineTaint: true") {
				t.Errorf("kubectl kustomize %s+quarantine: config.yaml =\n%s", tc.component, c)
			}
		}
		if !found {
			t.Errorf("kubectl kustomize %s+quarantine rendered no ConfigMap/pinwarden:\n%s", tc.component, out)
		}
	}
}
