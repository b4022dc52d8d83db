package deploy

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/pinwarden/pinwarden/agent"
)

// renderComponents renders the base with the named components of
// kubernetes/components, as a user's kustomization listing them would.
func renderComponents(t *testing.T, components ...string) []object {
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
	paths := make([]string, len(components))
	for i, c := range components {
		paths[i] = rel + "/components/" + c
	}
	k := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [%s/base]\ncomponents: [%s]\n",
		rel, strings.Join(paths, ", "))
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o600); err != nil {
		t.Fatal(err)
	}
	return render(t, dir)
}

// TestPullSecretsComponent: `get` on pods and secrets comes only with
// components/pullsecrets (the contract's RBAC), which also turns
// registries.podPullSecrets on and changes nothing else of the base's
// config, alone or beside the quarantine component.
func TestPullSecretsComponent(t *testing.T) {
	base := []rule{{"", "events", "create"}, {"", "events", "patch"}, {"", "nodes", "get"}, {"", "nodes/status", "patch"}}
	ps := []rule{{"", "pods", "get"}, {"", "secrets", "get"}}
	withTaint := append(slices.Clone(base), rule{"", "nodes", "patch"})
	var baseCM corev1.ConfigMap
	find(t, render(t, "kubernetes"), "ConfigMap", "pinwarden", &baseCM)
	const off, on = "podPullSecrets: false  #", "podPullSecrets: true  #"
	if strings.Count(baseCM.Data["config.yaml"], off) != 1 {
		t.Fatalf("base config.yaml has no line %q for the component to turn on", off)
	}
	for _, tt := range []struct {
		components []string
		rules      []rule
		taint      bool
	}{
		{[]string{"pullsecrets"}, slices.Concat(base, ps), false},
		{[]string{"quarantine", "pullsecrets"}, slices.Concat(withTaint, ps), true},
		{[]string{"pullsecrets", "quarantine"}, slices.Concat(withTaint, ps), true},
	} {
		t.Run(strings.Join(tt.components, "+"), func(t *testing.T) {
			objs := renderComponents(t, tt.components...)
			want := slices.Clone(tt.rules)
			sortRules(want)
			if got := rules(t, objs); !slices.Equal(got, want) {
				t.Errorf("ClusterRole rules = %v, want %v", got, want)
			}
			for _, o := range objs {
				if o.Name == "pinwarden-pullsecrets-values" {
					t.Errorf("the replacement's source %s was rendered", o.Kind)
				}
			}
			var cm corev1.ConfigMap
			find(t, objs, "ConfigMap", "pinwarden", &cm)
			wantCfg := strings.Replace(baseCM.Data["config.yaml"], off, on, 1)
			if tt.taint {
				wantCfg = strings.Replace(wantCfg, "quarantineTaint: false", "quarantineTaint: true", 1)
			}
			if strings.TrimSpace(cm.Data["config.yaml"]) != strings.TrimSpace(wantCfg) {
				t.Errorf("config:\n%s\nwant the base config with only the component's keys on:\n%s", cm.Data["config.yaml"], wantCfg)
			}
			s, err := agent.LoadSettings(mountConfig(t, objs, map[string][]byte{"ci.pub": newKey(t)}))
			if err != nil {
				t.Fatalf("config does not load: %v", err)
			}
			if r := s.Config.Registries; !r.PodPullSecrets || !s.Config.Kubernetes.Enabled || s.Config.Kubernetes.QuarantineTaint != tt.taint {
				t.Errorf("podPullSecrets = %v, kubernetes = %+v", r.PodPullSecrets, s.Config.Kubernetes)
			}
		})
	}
}
