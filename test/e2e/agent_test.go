// Package e2e runs the pinwarden agent binary exactly as a user would: a
// config file, a private containerd over its real socket, a registry with
// cosign-signed images, and the agent's /metrics and /v1/images read over HTTP.
package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/pinwarden/pinwarden/agent/status"
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
	binPath = os.Getenv("PINWARDEN_BIN")
	if binPath == "" {
		dir, err := os.MkdirTemp("", "pinwarden-e2e-bin")
		if err != nil {
			log.Print(err)
			return 1
		}
		defer os.RemoveAll(dir)
		binPath = filepath.Join(dir, "pinwarden")
		build := exec.Command("go", "build", "-o", binPath, "github.com/pinwarden/pinwarden/cmd/pinwarden")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			log.Printf("build pinwarden: %v", err)
			return 1
		}
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
	h := registry.New(registry.WithReferrersSupport(true), registry.Logger(log.New(io.Discard, "", 0)))
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
	return &config{metrics: freeAddr(e.t), status: freeAddr(e.t), policies: policies}
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

// agentProc is a running `pinwarden agent`.
type agentProc struct {
	t       *testing.T
	cmd     *exec.Cmd
	cfg     *config
	logPath string
	done    chan struct{}
	err     error // exit status, set before done is closed
}

// startAgent runs the agent binary on the env's config file and waits for
// /readyz.
func (e *env) startAgent(c *config) *agentProc {
	e.t.Helper()
	logf, err := os.CreateTemp(e.dir, "agent-*.log")
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command(binPath, "agent", "--config", e.configPath())
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		e.t.Fatalf("start agent: %v", err)
	}
	a := &agentProc{t: e.t, cmd: cmd, cfg: c, logPath: logf.Name(), done: make(chan struct{})}
	go func() { a.err = cmd.Wait(); _ = logf.Close(); close(a.done) }()
	e.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-a.done
		if e.t.Failed() {
			e.t.Logf("agent log:\n%s", a.log())
		}
	})
	eventually(e.t, 20*time.Second, "agent ready", func() (bool, string) {
		select {
		case <-a.done:
			e.t.Fatalf("agent exited at start: %v\n%s", a.err, a.log())
		default:
		}
		resp, err := http.Get("http://" + c.metrics + "/readyz")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status
	})
	return a
}

func (a *agentProc) log() string {
	b, _ := os.ReadFile(a.logPath)
	return string(b)
}

// stop sends SIGTERM and asserts a clean exit within 5 s.
func (a *agentProc) stop() {
	a.t.Helper()
	start := time.Now()
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		a.t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-a.done:
	case <-time.After(5 * time.Second):
		a.t.Fatalf("agent still running 5 s after SIGTERM\n%s", a.log())
	}
	if a.err != nil {
		a.t.Fatalf("agent exited with %v after SIGTERM\n%s", a.err, a.log())
	}
	a.t.Logf("agent stopped %v after SIGTERM", time.Since(start).Round(time.Millisecond))
}

// images is the agent's GET /v1/images keyed by digest.
func (a *agentProc) images() map[string]status.Image {
	a.t.Helper()
	ctx, cancel := context.WithTimeout(a.t.Context(), 5*time.Second)
	defer cancel()
	imgs, err := status.Fetch(ctx, http.DefaultClient, a.cfg.status)
	if err != nil {
		a.t.Fatalf("GET /v1/images: %v", err)
	}
	out := map[string]status.Image{}
	for _, im := range imgs {
		out[im.Digest] = im
	}
	return out
}

// metrics scrapes /metrics and returns the samples by series name with
// labels sorted as Prometheus prints them: `name{a="x",b="y"}`.
func (a *agentProc) metrics() map[string]float64 {
	a.t.Helper()
	resp, err := http.Get("http://" + a.cfg.metrics + "/metrics")
	if err != nil {
		a.t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			a.t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		a.t.Fatalf("read /metrics: %v", err)
	}
	return out
}

// sum adds the samples of name whose labels contain every label in want
// (each `k="v"`).
func sum(samples map[string]float64, name string, want ...string) float64 {
	var total float64
	for series, v := range samples {
		n, labels, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		ok := true
		for _, w := range want {
			if !strings.Contains(labels, w) {
				ok = false
			}
		}
		if ok {
			total += v
		}
	}
	return total
}

// waitVerdict waits until digest has a verdict other than "queued" and
// returns it.
func (a *agentProc) waitVerdict(digest string, timeout time.Duration) status.Image {
	a.t.Helper()
	var im status.Image
	eventually(a.t, timeout, "verdict for "+digest, func() (bool, string) {
		var ok bool
		im, ok = a.images()[digest]
		return ok && im.Reason != "queued" && im.Verdict != "", fmt.Sprintf("%+v", im)
	})
	return im
}

// eventually polls cond every 10 ms until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		ok, state := cond()
		if ok {
			return
		}
		last = state
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s; last state: %s", timeout, what, last)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// freeAddr returns a loopback host:port that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
