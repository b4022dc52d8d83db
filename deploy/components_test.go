package deploy

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

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

// renderComponents renders the base with the named components of
// kubernetes/components, as a user's kustomization listing them would.
func renderComponents(t *testing.T, components ...string) []object {
	t.Helper()
	return render(t, withComponents(t, components...))
}

// componentLines are the lines of base/config.yaml that each component sets,
// as the base has them and as the component leaves them. Each component
// replaces the text after the first occurrence of the key's name in the file
// (up to the second, on the same line, or to the end for the quarantine), so
// that occurrence must be the one on this line.
var componentLines = map[string][][2]string{
	"pullsecrets": {{
		"podPullSecrets: false  # <- components/pullsecrets turns on podPullSecrets",
		"podPullSecrets: true  # <- components/pullsecrets turns on podPullSecrets",
	}},
	"credential-provider": {{
		`credentialProviderConfig: ""  # <- components/credential-provider sets credentialProviderConfig`,
		"credentialProviderConfig: /etc/kubelet-credential-provider/config  # <- components/credential-provider sets credentialProviderConfig",
	}, {
		`credentialProviderBinDir: ""  # <- components/credential-provider sets credentialProviderBinDir`,
		"credentialProviderBinDir: /etc/kubelet-credential-provider/bin  # <- components/credential-provider sets credentialProviderBinDir",
	}},
	"quarantine": {{"quarantineTaint: false", "quarantineTaint: true"}},
}

// wantConfig is config.yaml text (the base's) with the lines the
// components set (the -aks and -gke credential providers set those of
// credential-provider), after checking that it has each line once, with the
// key's name nowhere before it.
func wantConfig(t *testing.T, base string, components ...string) string {
	t.Helper()
	want := base
	for _, c := range components {
		c = strings.TrimSuffix(strings.TrimSuffix(c, "-aks"), "-gke")
		lines, ok := componentLines[c]
		if !ok {
			t.Fatalf("no componentLines for %s", c)
		}
		for _, l := range lines {
			from, to := l[0], l[1]
			name := from[:strings.Index(from, ":")]
			if n := strings.Count(base, from); n != 1 {
				t.Fatalf("config.yaml has the line %q %d times, want once for components/%s to set", from, n, c)
			}
			if strings.Index(base, name) != strings.Index(base, from) {
				t.Fatalf("config.yaml names %s before the line %q that components/%s sets", name, from, c)
			}
			want = strings.Replace(want, from, to, 1)
		}
	}
	return want
}
