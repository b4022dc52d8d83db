package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestValidateRefuses(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := filepath.Join(dir, "ci.pub")
	root := filepath.Join(dir, "root.json")
	for _, f := range []string{key, root} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name string
		yaml string
		want []string // every string must appear in the error
	}{
		{
			// Issue 10: policy.Compile refused it, Validate did not.
			name: "tlog on keys without trustedRoot",
			yaml: "policies:\n- name: p\n  images: [\"**\"]\n  keys: [ci.pub]\n  tlog: true\n",
			want: []string{"policies[0] (p).tlog", key, "trustedRoot"},
		},
		{
			// Issue 10 hole 5: only valid once wrapped in ^(?:...)$.
			name: "regexp that does not parse alone",
			yaml: "trustedRoot: root.json\npolicies:\n- name: p\n  images: [\"**\"]\n  keyless:\n  - issuer: https://i\n    subjectRegExp: 'ci@example\\.com)|(.*'\n",
			want: []string{"policies[0] (p).keyless[0].subjectRegExp"},
		},
		{
			name: "ambiguous glob",
			yaml: "policies:\n- name: p\n  images: [\"*/nginx\"]\n  deny: true\n",
			want: []string{"policies[0] (p).images[0]", "docker.io/*/nginx"},
		},
		{
			name: "bad glob host",
			yaml: "policies:\n- name: p\n  images: [\"reg.example./app\"]\n  deny: true\n",
			want: []string{"policies[0] (p).images[0]", "reg.example."},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := Parse([]byte(tt.yaml), dir)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
	// The same policy with a trusted root is fine.
	if _, err := Parse([]byte("trustedRoot: root.json\npolicies:\n- name: p\n  images: [\"**\"]\n  keys: [ci.pub]\n  tlog: true\n"), dir); err != nil {
		t.Errorf("tlog with trustedRoot refused: %v", err)
	}
}

// The agent starts on a config whose Secret is not mounted yet: LoadStatic
// accepts missing files, Load refuses them, and Files names every one.
func TestLoadStaticAndFiles(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	y := "trustedRoot: keys/root.json\nregistries:\n  dockerConfig: creds/config.json\npins: [pins.txt]\n" +
		"policies:\n- name: p\n  images: [\"**\"]\n  keys: [keys/ci.pub, keys/ci.pub, /abs/other.pub]\n"
	if err := os.WriteFile(path, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil || !strings.Contains(err.Error(), "policies[0] (p).keys[0]") {
		t.Fatalf("Load with missing key files = %v", err)
	}
	c, err := LoadStatic(path)
	if err != nil {
		t.Fatalf("LoadStatic = %v", err)
	}
	want := []string{filepath.Join(dir, "keys/root.json"), filepath.Join(dir, "creds/config.json"),
		filepath.Join(dir, "keys/ci.pub"), "/abs/other.pub", filepath.Join(dir, "pins.txt")}
	if got := c.Files(); !slices.Equal(got, want) {
		t.Errorf("Files = %q, want %q", got, want)
	}
	// A broken config is still refused without looking at files.
	if err := os.WriteFile(path, []byte("policies: [{name: p, images: [\"*/x\"], deny: true}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadStatic(path); err == nil {
		t.Error("LoadStatic accepted a bad glob")
	}
}
