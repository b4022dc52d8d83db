// Package e2e runs the pinwarden agent binary exactly as a user would: a
// config file, a private containerd over its real socket, a registry with
// cosign-signed images, and the agent's /metrics and /v1/images read over HTTP.
package e2e

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

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

// switchRegistry is an in-process OCI registry that can be taken down:
// while down, every connection is closed without an answer, as a registry
// that went away looks to a client.
type switchRegistry struct {
	Host string
	down atomic.Bool
}

func startRegistry(t *testing.T) *switchRegistry {
	t.Helper()
	r := &switchRegistry{}
	h := harness.RegistryHandler()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if r.down.Load() {
			if hj, ok := w.(http.Hijacker); ok {
				if c, _, err := hj.Hijack(); err == nil {
					_ = c.Close()
					return
				}
			}
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		h.ServeHTTP(w, req)
	}))
	t.Cleanup(srv.Close)
	r.Host = strings.TrimPrefix(srv.URL, "http://")
	return r
}

// env is one test's node: a private containerd, a registry, a signer and a
// directory for the agent's config, pins and state.
type env struct {
	t      *testing.T
	ctr    *harness.Containerd
	reg    *switchRegistry
	rt     *cri.Client
	signer *harness.Signer
	dir    string
}

func newEnv(t *testing.T, opts ...harness.Option) *env {
	t.Helper()
	reg := startRegistry(t)
	ctr := harness.StartContainerd(t, append([]harness.Option{harness.WithInsecureRegistry(reg.Host)}, opts...)...)
	rt, err := cri.Dial(t.Context(), ctr.Endpoint(), "k8s.io")
	if err != nil {
		t.Fatalf("dial containerd: %v", err)
	}
	t.Cleanup(func() { _ = rt.Close() })
	return &env{t: t, ctr: ctr, reg: reg, rt: rt, signer: harness.NewSigner(t), dir: t.TempDir()}
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

// config is the agent config of a test; policies is the YAML list under
// policies:.
type config struct {
	metrics, status string
	policies        string
	pins            []string
}

func (e *env) newConfig(policies string) *config {
	return &config{metrics: harness.FreeAddr(e.t), status: harness.FreeAddr(e.t), policies: policies}
}

func (e *env) configPath() string { return filepath.Join(e.dir, "config.yaml") }

// writeConfig writes c (or raw text, when raw is not empty) to the config
// path by rename, as editors and ConfigMap updates do.
func (e *env) writeConfig(c *config, raw string) {
	e.t.Helper()
	text := raw
	if text == "" {
		pins := "[]"
		if len(c.pins) > 0 {
			pins = "[" + strings.Join(c.pins, ", ") + "]"
		}
		text = fmt.Sprintf(`runtimeEndpoint: %s
containerdNamespace: k8s.io
nodeName: e2e-node
stateDir: %s
metricsAddress: %s
statusAddress: %s
registries:
  insecure: [%q]
pins: %s
prefetch: {enabled: false}
kubernetes: {enabled: false}
policies:
%s
`, e.ctr.Endpoint(), filepath.Join(e.dir, "state"), c.metrics, c.status, e.reg.Host, pins, c.policies)
	}
	e.writeFile(e.configPath(), text)
}

func (e *env) writeFile(path, text string) {
	e.t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o600); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		e.t.Fatal(err)
	}
}

// keyPolicy is one policy entry that trusts the given signers.
func keyPolicy(name, glob string, signers ...*harness.Signer) string {
	keys := make([]string, len(signers))
	for i, s := range signers {
		keys[i] = strconv.Quote(s.PubPath)
	}
	return fmt.Sprintf("  - name: %s\n    images: [%q]\n    keys: [%s]\n", name, glob, strings.Join(keys, ", "))
}

func denyPolicy(name, glob string) string {
	return fmt.Sprintf("  - name: %s\n    images: [%q]\n    deny: true\n", name, glob)
}

// startAgent runs the agent binary on the env's config file and waits for
// /readyz.
func (e *env) startAgent(c *config) *harness.Agent {
	e.t.Helper()
	return harness.StartAgent(e.t, binPath, e.configPath(), c.metrics, c.status)
}

// stop stops a with SIGTERM (a clean exit within 5 s) and logs how long it took.
func stop(t *testing.T, a *harness.Agent) {
	t.Helper()
	t.Logf("agent stopped %v after SIGTERM", a.Stop().Round(time.Millisecond))
}
