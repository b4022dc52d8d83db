package harness

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/status"
)

// AgentBinary returns the pinwarden binary for end-to-end runs: $PINWARDEN_BIN
// (make test and make bench set it), else one built now into dir. Call it
// from TestMain, where a failed build can still stop the package.
func AgentBinary(dir string) (string, error) {
	if p := os.Getenv("PINWARDEN_BIN"); p != "" {
		return p, nil
	}
	bin := filepath.Join(dir, "pinwarden")
	build := exec.Command("go", "build", "-o", bin, "github.com/pinwarden/pinwarden/cmd/pinwarden")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return "", fmt.Errorf("build pinwarden: %w", err)
	}
	return bin, nil
}

// Agent is a running `pinwarden agent --config FILE`, owned by one test.
type Agent struct {
	t          testing.TB
	cmd        *exec.Cmd
	MetricsURL string // http://host:port of metricsAddress
	StatusAddr string // host:port of statusAddress
	logPath    string
	client     *http.Client
	done       chan struct{}
	err        error // exit status, set before done is closed
}

// AgentOption configures ExecAgent and StartAgent.
type AgentOption func(*exec.Cmd)

// WithAgentEnv adds environment variables (KEY=VALUE) to the agent's.
func WithAgentEnv(env ...string) AgentOption {
	return func(c *exec.Cmd) { c.Env = append(os.Environ(), env...) }
}

// StartAgent runs bin on configPath, whose metricsAddress and statusAddress
// must be metricsAddr and statusAddr, and waits until /readyz answers 200. The
// agent is killed when the test ends; its log is printed if the test failed.
func StartAgent(t testing.TB, bin, configPath, metricsAddr, statusAddr string, opts ...AgentOption) *Agent {
	t.Helper()
	a := ExecAgent(t, bin, configPath, metricsAddr, statusAddr, opts...)
	a.WaitReady(20 * time.Second)
	return a
}

// ExecAgent is StartAgent without the wait: it returns as soon as the
// process runs (benchmarks time the start-up themselves).
func ExecAgent(t testing.TB, bin, configPath, metricsAddr, statusAddr string, opts ...AgentOption) *Agent {
	t.Helper()
	SkipShort(t, "the agent binary")
	logf, err := os.CreateTemp(t.TempDir(), "agent-*.log")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "agent", "--config", configPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	for _, o := range opts {
		o(cmd)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start agent: %v", err)
	}
	a := &Agent{t: t, cmd: cmd, MetricsURL: "http://" + metricsAddr, StatusAddr: statusAddr,
		logPath: logf.Name(), done: make(chan struct{}),
		client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}}
	go func() { a.err = cmd.Wait(); _ = logf.Close(); close(a.done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-a.done
		if t.Failed() {
			t.Logf("agent log:\n%s", a.Log())
		}
	})
	return a
}

// WaitReady waits until /readyz answers 200 (the agent has listed the
// runtime), failing the test if the agent exits first or timeout passes.
func (a *Agent) WaitReady(timeout time.Duration) {
	a.t.Helper()
	Eventually(a.t, timeout, "agent ready", func() (bool, string) {
		select {
		case <-a.done:
			a.t.Fatalf("agent exited at start: %v\n%s", a.err, a.Log())
		default:
		}
		_, err := a.get(a.t.Context(), a.MetricsURL+"/readyz")
		if err != nil {
			return false, err.Error()
		}
		return true, ""
	})
}

// Exited is closed when the agent process has exited.
func (a *Agent) Exited() <-chan struct{} { return a.done }

// PID is the agent's process ID.
func (a *Agent) PID() int { return a.cmd.Process.Pid }

// Log is everything the agent has logged so far.
func (a *Agent) Log() string {
	b, _ := os.ReadFile(a.logPath)
	return string(b)
}

// Stop sends SIGTERM and fails the test unless the agent exits 0 within 5 s.
// It returns how long the shutdown took.
func (a *Agent) Stop() time.Duration {
	a.t.Helper()
	start := time.Now()
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		a.t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-a.done:
	case <-time.After(5 * time.Second):
		a.t.Fatalf("agent still running 5 s after SIGTERM\n%s", a.Log())
	}
	if a.err != nil {
		a.t.Fatalf("agent exited with %v after SIGTERM\n%s", a.err, a.Log())
	}
	return time.Since(start)
}

// Images is the agent's GET /v1/images keyed by digest.
func (a *Agent) Images() map[string]status.Image {
	a.t.Helper()
	imgs, err := a.TryImages(a.t.Context())
	if err != nil {
		a.t.Fatalf("GET /v1/images: %v", err)
	}
	out := make(map[string]status.Image, len(imgs))
	for _, im := range imgs {
		out[im.Digest] = im
	}
	return out
}

// TryImages is GET /v1/images, with the error instead of a failed test (to
// poll an agent that may not listen yet).
func (a *Agent) TryImages(ctx context.Context) ([]status.Image, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return status.Fetch(ctx, a.client, a.StatusAddr)
}

// Metrics scrapes /metrics and returns the samples keyed by series as
// Prometheus prints them: `name{a="x",b="y"}`.
func (a *Agent) Metrics() map[string]float64 {
	a.t.Helper()
	m, err := a.TryMetrics(a.t.Context())
	if err != nil {
		a.t.Fatal(err)
	}
	return m
}

// TryMetrics is Metrics with the error instead of a failed test.
func (a *Agent) TryMetrics(ctx context.Context) (map[string]float64, error) {
	b, err := a.get(ctx, a.MetricsURL+"/metrics")
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics line %q: %w", line, err)
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read /metrics: %w", err)
	}
	return out, nil
}

// get returns the body of a 200 answer to GET url.
func (a *Agent) get(ctx context.Context, url string) ([]byte, error) {
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
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return b, nil
}

// LogTime returns the time of the first line of the agent's log that
// contains msg (slog text: time=RFC3339 ... msg="..."), or the zero time.
func (a *Agent) LogTime(msg string) time.Time {
	for line := range strings.SplitSeq(a.Log(), "\n") {
		if !strings.Contains(line, `msg="`+msg+`"`) && !strings.Contains(line, "msg="+msg+" ") {
			continue
		}
		f, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
		if at, err := time.Parse(time.RFC3339Nano, f); err == nil {
			return at
		}
	}
	return time.Time{}
}

// WaitVerdict waits until digest has a verdict other than "pending/queued"
// (not judged yet) and returns it.
func (a *Agent) WaitVerdict(digest string, timeout time.Duration) status.Image {
	a.t.Helper()
	var im status.Image
	Eventually(a.t, timeout, "verdict for "+digest, func() (bool, string) {
		var ok bool
		im, ok = a.Images()[digest]
		return ok && im.Reason != "queued" && im.Verdict != "", fmt.Sprintf("%+v", im)
	})
	return im
}

// SumMetric adds the samples of name whose labels contain every one of want
// (each `k="v"`).
func SumMetric(samples map[string]float64, name string, want ...string) float64 {
	var total float64
	for series, v := range samples {
		n, labels, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(labels, w)
		}
		if ok {
			total += v
		}
	}
	return total
}

// Eventually polls cond every 10 ms until it holds, or fails the test after
// timeout with the last state cond reported.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s; last state: %s", timeout, what, state)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// FreeAddr returns a loopback host:port that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Outputs returns what the agent shows, as text: its log, /metrics and the
// status API's /v1/images (e.g. to scan for credentials with Leaks).
func (a *Agent) Outputs() map[string]string {
	a.t.Helper()
	out := map[string]string{"log": a.Log()}
	for where, url := range map[string]string{"metrics": a.MetricsURL + "/metrics", "status API": "http://" + a.StatusAddr + "/v1/images"} {
		b, err := a.get(a.t.Context(), url)
		if err != nil {
			a.t.Fatal(err)
		}
		out[where] = string(b)
	}
	return out
}
