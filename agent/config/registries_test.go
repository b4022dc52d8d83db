package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestRegistriesNodeSources(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cpc := filepath.Join(dir, "cp.yaml")
	if err := os.WriteFile(cpc, []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, yaml, wantErr string
	}{
		{"defaults", "", ""},
		{"provider config and dir", "registries: {credentialProviderConfig: cp.yaml, credentialProviderBinDir: bin}", ""},
		{"config without dir", "registries: {credentialProviderConfig: cp.yaml}", "registries.credentialProviderBinDir: required"},
		{"dir without config", "registries: {credentialProviderBinDir: bin}", "registries.credentialProviderConfig: required"},
		{"missing config", "registries: {credentialProviderConfig: nope.yaml, credentialProviderBinDir: bin}", "registries.credentialProviderConfig:"},
		{"dir is a file", "registries: {credentialProviderConfig: cp.yaml, credentialProviderBinDir: cp.yaml}", "is not a directory"},
		{"hosts dir missing is fine", "registries: {containerdHostsDir: /nonexistent/certs.d}", ""},
		{"hosts dir is a file", "registries: {containerdHostsDir: cp.yaml}", "registries.containerdHostsDir:"},
		{"pod pull secrets", "registries: {podPullSecrets: true}", ""},
		{"pod pull secrets without kubernetes", "registries: {podPullSecrets: true}\nkubernetes: {enabled: false}",
			"registries.podPullSecrets: needs kubernetes.enabled: true"},
		{"kubernetes off without pod pull secrets", "kubernetes: {enabled: false}", ""},
		{"unknown key", "registries: {podPullSecret: true}", "unknown field"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, err := Parse([]byte(tt.yaml), dir)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Parse error = %v, want it to contain %q (config %+v)", err, tt.wantErr, c)
			}
		})
	}
	c, err := Parse(nil, dir)
	if err != nil {
		t.Fatal(err)
	}
	if c.Registries.ContainerdHostsDir != "/etc/containerd/certs.d" || c.Registries.PodPullSecrets {
		t.Fatalf("defaults: %+v", c.Registries)
	}
	c, err = Parse([]byte("registries: {credentialProviderConfig: cp.yaml, credentialProviderBinDir: bin}"), dir)
	if err != nil {
		t.Fatal(err)
	}
	if c.Registries.CredentialProviderConfig != cpc || c.Registries.CredentialProviderBinDir != bin {
		t.Fatalf("relative paths not resolved: %+v", c.Registries)
	}
}

// TestFilesWatchesCredentialProviderConfig: the kubelet's credential
// provider config is watched like the docker config.
func TestFilesWatchesCredentialProviderConfig(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for _, f := range []string{"cp.yaml", "config.json"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("{}"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	c, err := Parse([]byte("registries: {dockerConfig: config.json, credentialProviderConfig: cp.yaml, credentialProviderBinDir: bin}"), dir)
	if err != nil {
		t.Fatal(err)
	}
	files := c.Files()
	for _, want := range []string{filepath.Join(dir, "config.json"), filepath.Join(dir, "cp.yaml")} {
		if !slices.Contains(files, want) {
			t.Errorf("Files() = %v, lacks %s", files, want)
		}
	}
}
