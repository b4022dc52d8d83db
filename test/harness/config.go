package harness

import (
	"os"
	"path/filepath"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/pinwarden/pinwarden/agent/config"
)

// AgentConfig returns an agent config for a test: the defaults of
// config.Default() on the runtime endpoint (a containerd's Endpoint), state
// under stateDir, no Kubernetes reporting, no prefetch, and no listeners
// (set MetricsAddress and StatusAddress to run `pinwarden agent`). Tests
// change its fields and write it with WriteConfig; the compiler checks every
// key, and the file is what the agent parses.
func AgentConfig(endpoint, stateDir string) *config.Config {
	c := config.Default()
	c.RuntimeEndpoint = endpoint
	c.NodeName = "test-node"
	c.StateDir = stateDir
	c.MetricsAddress, c.StatusAddress = "", ""
	c.Prefetch.Enabled = false
	c.Kubernetes.Enabled = false
	return c
}

// KeyPolicy is a policy that requires a signature by one of the public keys
// (PEM files, e.g. Signer.PubPath) for the images matching glob.
func KeyPolicy(name, glob string, keys ...string) config.Policy {
	return config.Policy{Name: name, Images: []string{glob}, Keys: keys}
}

// DenyPolicy is a policy that rejects the images matching glob.
func DenyPolicy(name, glob string) config.Policy {
	return config.Policy{Name: name, Images: []string{glob}, Deny: true}
}

// ConfigYAML renders c as the YAML file the agent reads.
func ConfigYAML(t testing.TB, c *config.Config) []byte {
	t.Helper()
	b, err := yaml.Marshal(c)
	if err != nil {
		t.Fatalf("marshal config: %v", err)
	}
	return b
}

// Parsed returns c as the agent sees it: rendered to YAML and parsed and
// validated by config.Parse (defaults, resolved paths), for tests that build
// policies or verifiers from a config without writing a file.
func Parsed(t testing.TB, c *config.Config) *config.Config {
	t.Helper()
	b := ConfigYAML(t, c)
	parsed, err := config.Parse(b, "")
	if err != nil {
		t.Fatalf("test config does not parse: %v\n%s", err, b)
	}
	return parsed
}

// WriteConfig writes c as YAML to path, by rename (as editors and ConfigMap
// updates replace a file), and returns path. The result must parse: a test
// config that the agent would refuse fails the test here.
func WriteConfig(t testing.TB, path string, c *config.Config) string {
	t.Helper()
	b := ConfigYAML(t, c)
	if _, err := config.Parse(b, filepath.Dir(path)); err != nil {
		t.Fatalf("test config does not parse: %v\n%s", err, b)
	}
	WriteFile(t, path, b)
	return path
}

// WriteFile replaces path with b by rename, so a watcher never reads half a
// file.
func WriteFile(t testing.TB, path string, b []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}
