package deploy

import (
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/pinwarden/pinwarden/agent"
)

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
			wantCfg := wantConfig(t, baseCM.Data["config.yaml"], tt.components...)
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
			if r := s.Config.Registries; r.CredentialProviderConfig != "" || r.CredentialProviderBinDir != "" {
				t.Errorf("credential provider keys set without a credential-provider component: %+v", r)
			}
		})
	}
}
