package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/pinwarden/pinwarden/agent/config"
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

// benchConfig is the agent config of the end-to-end benchmarks: containerd
// at endpoint, state under dir, listeners on free loopback ports, and one
// policy "bench" that requires keyPath's signature for the images matching
// glob; insecure registries are reached over plain HTTP.
func benchConfig(t *testing.T, endpoint, dir, glob, keyPath string, insecure ...string) *config.Config {
	t.Helper()
	c := harness.AgentConfig(endpoint, filepath.Join(dir, "state"))
	c.NodeName = "bench-node"
	c.MetricsAddress, c.StatusAddress = harness.FreeAddr(t), harness.FreeAddr(t)
	c.Registries.Insecure = append(c.Registries.Insecure, insecure...)
	c.Policies = []config.Policy{harness.KeyPolicy("bench", glob, keyPath)}
	return c
}

// writeConfig writes c to dir/config.yaml and returns the path.
func writeConfig(t *testing.T, dir string, c *config.Config) string {
	t.Helper()
	return harness.WriteConfig(t, filepath.Join(dir, "config.yaml"), c)
}

// startAgent execs `pinwarden agent --config cfgPath` (c is the config in
// that file) with env added to its environment, and returns at once.
// $PINWARDEN_BENCH_KEEP_LOGS names a directory to copy the agent's log to.
func startAgent(t *testing.T, c *config.Config, cfgPath string, env ...string) *harness.Agent {
	t.Helper()
	a := harness.ExecAgent(t, pinwardenBin(t), cfgPath, c.MetricsAddress, c.StatusAddress, harness.WithAgentEnv(env...))
	if keep := os.Getenv("PINWARDEN_BENCH_KEEP_LOGS"); keep != "" {
		n := strings.ReplaceAll(t.Name(), "/", "_") + fmt.Sprintf("-agent-%d.log", time.Now().UnixNano())
		t.Cleanup(func() { _ = os.WriteFile(filepath.Join(keep, n), []byte(a.Log()), 0o644) })
	}
	return a
}
