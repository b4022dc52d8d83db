package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/test/harness"
)

// gate skips t unless PINWARDEN_BENCH=1: these benchmarks take minutes and
// need root, containerd and the built binary.
func gate(t *testing.T) {
	t.Helper()
	if os.Getenv("PINWARDEN_BENCH") != "1" {
		t.Skip("set PINWARDEN_BENCH=1 to run (bench/run.sh does)")
	}
}

// record appends one figure to $PINWARDEN_BENCH_OUT as a markdown table row
// (bench/run.sh collects them into RESULTS.md) and logs it.
func record(t *testing.T, figure, value, goal, met string) {
	t.Helper()
	t.Logf("RESULT %s = %s (goal %s: %s)", figure, value, goal, met)
	out := os.Getenv("PINWARDEN_BENCH_OUT")
	if out == "" {
		return
	}
	cmd := os.Getenv("PINWARDEN_BENCH_CMD")
	if cmd == "" {
		cmd = "PINWARDEN_BENCH=1 go test -v -run '^" + strings.SplitN(t.Name(), "/", 2)[0] + "$' ./bench"
	}
	f, err := os.OpenFile(out, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("results file: %v", err)
	}
	defer f.Close()
	fmt.Fprintf(f, "| %s | %s | %s | %s | `%s` |\n", figure, value, goal, met, cmd)
}

// verdictMet renders a goal check.
func verdictMet(ok bool) string {
	if ok {
		return "met"
	}
	return "**missed**"
}

// median of a copy of d.
func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// percentile p (0..100) by nearest rank.
func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	i := int(float64(len(s))*p/100+0.999999) - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

// pinwardenBin is the binary under test: $PINWARDEN_BIN or ../bin/pinwarden.
func pinwardenBin(t *testing.T) string {
	t.Helper()
	p := os.Getenv("PINWARDEN_BIN")
	if p == "" {
		p, _ = filepath.Abs("../bin/pinwarden")
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("pinwarden binary %s missing: run make build (or make bench)", p)
	}
	return p
}

// countingRegistry is ggcr's in-memory registry behind a middleware that
// counts every request, and separately those made by pinwarden (its
// User-Agent starts with "pinwarden").
type countingRegistry struct {
	host      string
	all       atomic.Int64
	pinwarden atomic.Int64

	mu    sync.Mutex
	paths []string // guarded by mu: URL paths of pinwarden's requests
}

// pinwardenPaths returns the URL paths of pinwarden's requests so far.
func (cr *countingRegistry) pinwardenPaths() []string {
	cr.mu.Lock()
	defer cr.mu.Unlock()
	return slices.Clone(cr.paths)
}

func startRegistry(t *testing.T) *countingRegistry {
	t.Helper()
	cr := &countingRegistry{}
	reg := harness.RegistryHandler()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cr.all.Add(1)
		if strings.HasPrefix(r.UserAgent(), "pinwarden") {
			cr.pinwarden.Add(1)
			cr.mu.Lock()
			cr.paths = append(cr.paths, r.URL.Path)
			cr.mu.Unlock()
			if os.Getenv("PINWARDEN_BENCH_TRACE") != "" {
				t.Logf("registry: %s %s", r.Method, r.URL.Path)
			}
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	cr.host = strings.TrimPrefix(srv.URL, "http://")
	return cr
}

// pushSigned pushes a random ~1 KiB linux/amd64 image to ref (repo:tag),
// signs it with s and returns the digest reference.
func pushSigned(t *testing.T, s *harness.Signer, ref string) name.Digest {
	t.Helper()
	d := harness.PushRandomImage(t, ref, 1024)
	tag, err := name.NewTag(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	s.Sign(t, tag.Context().Name(), d)
	return tag.Context().Digest(d)
}

// agentConfig is what the benchmarks vary in the agent's config file.
type agentConfig struct {
	endpoint, stateDir, metrics, status string
	insecure                            []string
	images                              string // policy glob
	keyPath                             string
	extra                               string   // more lines of the registries: block
	env                                 []string // extra environment of the agent process
}

func writeConfig(t *testing.T, dir string, c agentConfig) string {
	t.Helper()
	ins, _ := json.Marshal(c.insecure)
	if c.insecure == nil {
		ins = []byte("[]")
	}
	y := fmt.Sprintf(`runtimeEndpoint: %q
containerdNamespace: k8s.io
nodeName: bench-node
stateDir: %q
metricsAddress: %q
statusAddress: %q
registries:
  insecure: %s
%spolicies:
  - name: bench
    images: [%q]
    keys: [%q]
prefetch: {enabled: false}
kubernetes: {enabled: false}
`, c.endpoint, c.stateDir, c.metrics, c.status, ins, c.extra, c.images, c.keyPath)
	p := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(p, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// agentProc is a running `pinwarden agent`.
type agentProc struct {
	t       *testing.T
	cmd     *exec.Cmd
	done    chan struct{}
	metrics string
	status  string
	client  *http.Client
	log     string
}

// startAgent execs `pinwarden agent --config cfg` and returns at once.
func startAgent(t *testing.T, cfg agentConfig, cfgPath string) *agentProc {
	t.Helper()
	logPath := filepath.Join(filepath.Dir(cfgPath), fmt.Sprintf("agent-%d.log", time.Now().UnixNano()))
	lf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(pinwardenBin(t), "agent", "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if len(cfg.env) > 0 {
		cmd.Env = append(os.Environ(), cfg.env...)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start agent: %v", err)
	}
	a := &agentProc{t: t, cmd: cmd, done: make(chan struct{}), metrics: cfg.metrics, status: cfg.status, log: logPath,
		client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}}
	go func() { _ = cmd.Wait(); _ = lf.Close(); close(a.done) }()
	t.Cleanup(func() {
		a.stop()
		if keep := os.Getenv("PINWARDEN_BENCH_KEEP_LOGS"); keep != "" {
			if b, err := os.ReadFile(logPath); err == nil {
				_ = os.WriteFile(filepath.Join(keep, strings.ReplaceAll(t.Name(), "/", "_")+"-"+filepath.Base(logPath)), b, 0o644)
			}
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			if len(b) > 4000 {
				b = b[len(b)-4000:]
			}
			t.Logf("agent log tail:\n%s", b)
		}
	})
	return a
}

// stop sends SIGTERM and waits (SIGKILL after 10 s).
func (a *agentProc) stop() {
	select {
	case <-a.done:
		return
	default:
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.done
	}
}

func (a *agentProc) get(ctx context.Context, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: HTTP %d", url, resp.StatusCode)
	}
	return b, nil
}

// waitReady polls /readyz until the agent has listed the runtime.
func (a *agentProc) waitReady(timeout time.Duration) {
	a.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if _, err := a.get(a.t.Context(), "http://"+a.metrics+"/readyz"); err == nil {
			return
		}
		select {
		case <-a.done:
			a.t.Fatal("agent exited before it was ready")
		case <-time.After(2 * time.Millisecond):
		}
	}
	a.t.Fatalf("agent not ready after %s", timeout)
}

// images fetches GET /v1/images.
func (a *agentProc) images(ctx context.Context) ([]status.Image, error) {
	b, err := a.get(ctx, "http://"+a.status+status.Path)
	if err != nil {
		return nil, err
	}
	var out []status.Image
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// metricValue returns the value of the sample line that starts with series
// (e.g. `pinwarden_images{verdict="verified"}`) on /metrics.
func (a *agentProc) metricValue(ctx context.Context, series string) (float64, error) {
	b, err := a.get(ctx, "http://"+a.metrics+"/metrics")
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(rest), 64)
		}
	}
	return 0, nil
}

// logTime returns the time of the first line of the agent's log that
// contains msg (slog text: time=RFC3339 ... msg="..."), or the zero time.
func (a *agentProc) logTime(msg string) time.Time {
	b, err := os.ReadFile(a.log)
	if err != nil {
		return time.Time{}
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if !strings.Contains(line, `msg="`+msg+`"`) {
			continue
		}
		f, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
		at, err := time.Parse(time.RFC3339Nano, f)
		if err == nil {
			return at
		}
	}
	return time.Time{}
}
