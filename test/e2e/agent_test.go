// Package e2e runs the pinwarden agent binary exactly as a user would: a
// config file, a private containerd over its real socket, a registry with
// cosign-signed images, and the agent's /metrics and /v1/images read over HTTP.
package e2e

import (
	"context"
	"log"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// binPath is the agent binary under test: $PINWARDEN_BIN (set by make test),
// else one built by TestMain.
var binPath string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "pinwarden-e2e-bin")
	if err != nil {
		log.Print(err)
		return 1
	}
	defer os.RemoveAll(dir)
	if binPath, err = harness.AgentBinary(dir); err != nil {
		log.Print(err)
		return 1
	}
	return m.Run()
}

// env is one test's node: a private containerd, a registry (that can be
// taken down), a signer and a directory for the agent's config, pins and
// state.
type env struct {
	t      *testing.T
	ctr    *harness.Containerd
	reg    *harness.CountingRegistry
	rt     *cri.Client
	signer *harness.Signer
	dir    string
}

func newEnv(t *testing.T, opts ...harness.Option) *env {
	t.Helper()
	n := harness.StartNode(t, opts...)
	return &env{t: t, ctr: n.Containerd, reg: n.Registry, rt: n.CRI, signer: harness.NewSigner(t), dir: t.TempDir()}
}

// push pushes a random image to repo:tag on the registry, signs it with s
// when s is not nil, and returns the tag reference and the digest.
func (e *env) push(repoTag string, s *harness.Signer) (ref, digest string) {
	e.t.Helper()
	ref = e.reg.Host + "/" + repoTag
	digest = harness.PushRandomImage(e.t, ref, 512)
	if s != nil {
		repo, _, _ := strings.Cut(ref[len(e.reg.Host):], ":")
		s.Sign(e.t, e.reg.Host+repo, digest)
	}
	return ref, digest
}

// pull pulls ref through CRI, as kubelet does.
func (e *env) pull(ref string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.t.Context(), 30*time.Second)
	defer cancel()
	if _, err := e.rt.PullImage(ctx, ref, nil); err != nil {
		e.t.Fatalf("pull %s: %v", ref, err)
	}
}

// newConfig is the agent config of a test: the env's containerd, state
// dir and registry, listeners on free loopback ports, and the policies.
func (e *env) newConfig(policies ...config.Policy) *config.Config {
	c := harness.AgentConfig(e.ctr.Endpoint(), filepath.Join(e.dir, "state"))
	c.NodeName = "e2e-node"
	c.MetricsAddress, c.StatusAddress = harness.FreeAddr(e.t), harness.FreeAddr(e.t)
	c.Registries.Insecure = []string{e.reg.Host}
	c.Policies = policies
	return c
}

func (e *env) configPath() string { return filepath.Join(e.dir, "config.yaml") }

// writeConfig writes c to the config path by rename, as editors and
// ConfigMap updates do.
func (e *env) writeConfig(c *config.Config) {
	e.t.Helper()
	harness.WriteConfig(e.t, e.configPath(), c)
}

func (e *env) writeFile(path, text string) {
	e.t.Helper()
	harness.WriteFile(e.t, path, []byte(text))
}

// keyPolicy is one policy entry that trusts the given signers.
func keyPolicy(name, glob string, signers ...*harness.Signer) config.Policy {
	keys := make([]string, len(signers))
	for i, s := range signers {
		keys[i] = s.PubPath
	}
	return harness.KeyPolicy(name, glob, keys...)
}

var denyPolicy = harness.DenyPolicy

// startAgent runs the agent binary on the env's config file and waits for
// /readyz.
func (e *env) startAgent(c *config.Config) *harness.Agent {
	e.t.Helper()
	return harness.StartAgent(e.t, binPath, e.configPath(), c.MetricsAddress, c.StatusAddress)
}

// stop stops a with SIGTERM (a clean exit within 5 s) and logs how long it took.
func stop(t *testing.T, a *harness.Agent) {
	t.Helper()
	t.Logf("agent stopped %v after SIGTERM", a.Stop().Round(time.Millisecond))
}
