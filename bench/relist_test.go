package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go"
	ocispecv1 "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/pinwarden/pinwarden/agent"
	"github.com/pinwarden/pinwarden/agent/cache"
	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// benchRegistry names the images of TestRelistAndIdle. No registry serves it:
// every verdict comes from the pre-warmed cache.
const benchRegistry = "registry.bench.local"

// TestRelistAndIdle: with N = 1,000 and 10,000 images on the node and a warm
// verdict cache, the time from agent start to every image showing its
// verdict (issue 4: <= 1 s at 10k), then the agent's RSS and idle CPU
// (<= 48 MiB / 64 MiB, <= 2 millicores).
func TestRelistAndIdle(t *testing.T) {
	gate(t)
	idle := 60 * time.Second
	if v, err := time.ParseDuration(os.Getenv("PINWARDEN_BENCH_IDLE")); err == nil && v > 0 {
		idle = v
	}
	for _, tc := range []struct {
		n          int
		relistGoal time.Duration // 0: no goal
		rssGoalMiB float64
	}{
		{0, 0, 0}, // the baseline: an agent with no images
		{1000, 0, 48},
		{10000, time.Second, 64},
	} {
		t.Run(strconv.Itoa(tc.n), func(t *testing.T) {
			// containerd commits (and fsyncs) one bbolt transaction per blob
			// and image record: on tmpfs, writing 10,000 images takes seconds,
			// not minutes. Set before the first t.TempDir of this test.
			if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() && os.Getenv("PINWARDEN_BENCH_DISK") == "" {
				t.Setenv("TMPDIR", "/dev/shm")
			}
			dir := t.TempDir()
			ctd := harness.StartContainerd(t, harness.WithFlavour(harness.Containerd2))
			start := time.Now()
			digests := createImages(t, ctd.Address(), tc.n)
			t.Logf("created %d images in containerd in %s", tc.n, time.Since(start).Round(time.Millisecond))
			// containerd's CRI plugin loads the image store at start-up.
			start = time.Now()
			ctd.Stop()
			ctd.Start()
			t.Logf("containerd restarted in %s", time.Since(start).Round(time.Millisecond))

			s := harness.NewSigner(t)
			ac := benchConfig(t, ctd.Endpoint(), dir, benchRegistry+"/**", s.PubPath)
			cfgPath := writeConfig(t, dir, ac)
			seedCache(t, cfgPath, ac.StateDir, digests)

			// First run: warms the agent's own view of the cache file; then
			// the measured restart on the same stateDir.
			first, _ := runUntilJudged(t, ac, cfgPath, tc.n, false, nil)
			took, a := runUntilJudged(t, ac, cfgPath, tc.n, true, nil)
			goal, met := "", ""
			if tc.relistGoal > 0 {
				goal, met = "<= "+tc.relistGoal.String(), verdictMet(took <= tc.relistGoal)
			}
			if tc.n > 0 {
				record(t, fmt.Sprintf("agent start -> all %d images with a verdict, warm cache (restart on the same stateDir; first start: %s). Agent log: %s", tc.n, ms(first), lastBreakdown),
					ms(took), goal, met)
			}

			// Idle: let the start-up settle, then measure over the window.
			time.Sleep(5 * time.Second)
			pid := a.PID()
			cpu0, at0 := cpuTicks(t, pid), time.Now()
			window := idle
			if tc.n == 0 {
				window = min(idle, 20*time.Second)
			}
			time.Sleep(window)
			cpu1, at1 := cpuTicks(t, pid), time.Now()
			rss, hwm := memKiB(t, pid, "VmRSS"), memKiB(t, pid, "VmHWM")
			millicores := float64(cpu1-cpu0) / float64(clockTicks(t)) / at1.Sub(at0).Seconds() * 1000
			rssMiB := float64(rss) / 1024
			rssGoal, rssMet := "", ""
			if tc.rssGoalMiB > 0 {
				rssGoal, rssMet = fmt.Sprintf("<= %.0f MiB", tc.rssGoalMiB), verdictMet(rssMiB <= tc.rssGoalMiB)
			}
			record(t, fmt.Sprintf("agent RSS with %d images, idle (peak VmHWM %.1f MiB; %s)", tc.n, float64(hwm)/1024, rssParts(t, pid)),
				fmt.Sprintf("%.1f MiB", rssMiB), rssGoal, rssMet)
			record(t, fmt.Sprintf("agent idle CPU with %d images, over %s", tc.n, window),
				fmt.Sprintf("%.2f millicores", millicores), "<= 2 millicores", verdictMet(millicores <= 2))
			if tc.n == 0 {
				return
			}
			a.Stop()

			// The runtime's share of a relist: the three calls the inventory
			// makes, timed from here (median of 3).
			rt, err := cri.Dial(t.Context(), ctd.Endpoint(), "k8s.io")
			if err != nil {
				t.Fatal(err)
			}
			defer rt.Close()
			var list, targets, conts []time.Duration
			for range 3 {
				start := time.Now()
				if _, err := rt.ListImages(t.Context()); err != nil {
					t.Fatal(err)
				}
				list = append(list, time.Since(start))
				start = time.Now()
				if _, err := rt.ImageTargets(t.Context()); err != nil {
					t.Fatal(err)
				}
				targets = append(targets, time.Since(start))
				start = time.Now()
				if _, err := rt.ListContainers(t.Context()); err != nil {
					t.Fatal(err)
				}
				conts = append(conts, time.Since(start))
			}
			record(t, fmt.Sprintf("of which the runtime calls of one relist, %d images, from a Go client, median of 3: CRI ListImages + containerd image list (%d names) + ListContainers", tc.n, 2*tc.n),
				fmt.Sprintf("%s + %s + %s", ms(median(list)), ms(median(targets)), ms(median(conts))), "", "")

			// The same start with GOMEMLIMIT at the RSS goal, as the DaemonSet
			// sets it from its memory limit: informational, the goal row above
			// is the default runtime.
			limit := []string{fmt.Sprintf("GOMEMLIMIT=%.0fMiB", tc.rssGoalMiB)}
			_, la := runUntilJudged(t, ac, cfgPath, tc.n, true, limit)
			time.Sleep(5 * time.Second)
			record(t, fmt.Sprintf("agent RSS with %d images and GOMEMLIMIT=%.0fMiB, 5 s after all verdicts (peak VmHWM %.1f MiB; %s)", tc.n, tc.rssGoalMiB,
				float64(memKiB(t, la.PID(), "VmHWM"))/1024, rssParts(t, la.PID())),
				fmt.Sprintf("%.1f MiB", float64(memKiB(t, la.PID(), "VmRSS"))/1024), "", "")
		})
	}
}

// createImages writes n distinct images straight into containerd's content
// and image stores (namespace k8s.io): one shared tiny layer, and per image
// its own config and manifest, named "repo:v1" and "repo@digest" as a CRI
// pull names them. It returns the manifest digests.
func createImages(t *testing.T, address string, n int) []string {
	t.Helper()
	cl, err := client.New(address, client.WithDefaultNamespace("k8s.io"))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, done, err := cl.WithLease(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = done(context.WithoutCancel(ctx)) }()
	cs, is := cl.ContentStore(), cl.ImageService()

	layer := make([]byte, 512)
	_, _ = rand.Read(layer)
	layerDesc := ocispecv1.Descriptor{MediaType: ocispecv1.MediaTypeImageLayer, Digest: digest.FromBytes(layer), Size: int64(len(layer))}
	if err := content.WriteBlob(ctx, cs, "bench-layer", bytes.NewReader(layer), layerDesc); err != nil {
		t.Fatalf("write layer: %v", err)
	}
	out := make([]string, n)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i := range n {
		g.Go(func() error {
			cfg := fmt.Appendf(nil, `{"architecture":"amd64","os":"linux","config":{"Labels":{"bench":"%d"}},"rootfs":{"type":"layers","diff_ids":[%q]}}`,
				i, layerDesc.Digest)
			cfgDesc := ocispecv1.Descriptor{MediaType: ocispecv1.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))}
			m, err := json.Marshal(ocispecv1.Manifest{Versioned: ocispec.Versioned{SchemaVersion: 2}, MediaType: ocispecv1.MediaTypeImageManifest,
				Config: cfgDesc, Layers: []ocispecv1.Descriptor{layerDesc}})
			if err != nil {
				return err
			}
			mDesc := ocispecv1.Descriptor{MediaType: ocispecv1.MediaTypeImageManifest, Digest: digest.FromBytes(m), Size: int64(len(m))}
			if err := content.WriteBlob(gctx, cs, "bench-cfg-"+cfgDesc.Digest.Encoded(), bytes.NewReader(cfg), cfgDesc); err != nil {
				return fmt.Errorf("write config %d: %w", i, err)
			}
			// GC labels: the manifest keeps its config and layer alive.
			labels := map[string]string{"containerd.io/gc.ref.content.config": cfgDesc.Digest.String(),
				"containerd.io/gc.ref.content.l.0": layerDesc.Digest.String()}
			if err := content.WriteBlob(gctx, cs, "bench-m-"+mDesc.Digest.Encoded(), bytes.NewReader(m), mDesc, content.WithLabels(labels)); err != nil {
				return fmt.Errorf("write manifest %d: %w", i, err)
			}
			repo := fmt.Sprintf("%s/bench/img-%d", benchRegistry, i)
			for _, name := range []string{repo + ":v1", repo + "@" + mDesc.Digest.String()} {
				if _, err := is.Create(gctx, images.Image{Name: name, Target: mDesc}); err != nil {
					return fmt.Errorf("create image %s: %w", name, err)
				}
			}
			out[i] = mDesc.Digest.String()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	return out
}

// seedCache writes a verified verdict for every digest under the config's
// policy fingerprint into the agent's verdict cache (the state a node has
// after verifying them once).
func seedCache(t *testing.T, cfgPath, stateDir string, digests []string) {
	t.Helper()
	s, err := agent.LoadSettings(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	p := s.Policies.Policies[0]
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	c, err := cache.Open(t.Context(), cache.PathIn(stateDir))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for _, d := range digests {
		c.Put(verdict.Result{Digest: d, Verdict: verdict.Verified, Policy: p.Name, Fingerprint: p.Fingerprint,
			Signers: []string{"sha256:bench"}, VerifiedAt: now}, 24*time.Hour)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

// runUntilJudged starts the agent and returns the time from exec to
// pinwarden_images{verdict="verified"} == n on /metrics, confirmed on
// /v1/images. The agent is stopped unless keep.
func runUntilJudged(t *testing.T, ac *config.Config, cfgPath string, n int, keep bool, env []string) (time.Duration, *harness.Agent) {
	t.Helper()
	defer func() {
		// Where the time went, from the agent's log.
		if a := lastAgent; a != nil {
			st, conn := a.LogTime("agent started"), a.LogTime("runtime connected")
			if !st.IsZero() && !conn.IsZero() {
				lastBreakdown = fmt.Sprintf("config and cache loaded at +%s, first relist done at +%s",
					st.Sub(lastStart).Round(time.Millisecond), conn.Sub(lastStart).Round(time.Millisecond))
				t.Log("agent log: " + lastBreakdown)
			}
		}
	}()
	start := time.Now()
	a := startAgent(t, ac, cfgPath, env...)
	lastAgent, lastStart = a, start
	deadline := start.Add(2 * time.Minute)
	for {
		m, err := a.TryMetrics(t.Context())
		v := m[`pinwarden_images{verdict="verified"}`]
		if err == nil && int(v) == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 2 minutes the agent shows %v of %d images verified (err %v)", v, n, err)
		}
		select {
		case <-a.Exited():
			t.Fatal("agent exited")
		case <-time.After(5 * time.Millisecond):
		}
	}
	took := time.Since(start)
	imgs, err := a.TryImages(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	verified := 0
	for _, im := range imgs {
		if im.Verdict == verdict.Verified {
			verified++
		}
	}
	if len(imgs) != n || verified != n {
		t.Fatalf("/v1/images lists %d images, %d verified; want %d", len(imgs), verified, n)
	}
	if !keep {
		a.Stop()
	}
	return took, a
}

// lastAgent and lastStart are the agent runUntilJudged started last (tests
// in this package do not run in parallel).
var (
	lastAgent     *harness.Agent
	lastStart     time.Time
	lastBreakdown string
)

// cpuTicks is utime+stime of pid in clock ticks (/proc/PID/stat fields 14, 15).
func cpuTicks(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// The command name (field 2) may hold spaces; fields restart after ')'.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("parse /proc/%d/stat: %v %v", pid, err1, err2)
	}
	return u + s
}

// memKiB reads a "Vm...:  N kB" line of /proc/PID/status.
func memKiB(t *testing.T, pid int, key string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, key+":"); ok {
			v, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	t.Fatalf("no %s in /proc/%d/status", key, pid)
	return 0
}

// rssParts names the anonymous (heap, stacks) and file-backed (binary text,
// the mmapped cache file) shares of the RSS of pid.
func rssParts(t *testing.T, pid int) string {
	t.Helper()
	return fmt.Sprintf("anon %.1f MiB, file %.1f MiB", float64(memKiB(t, pid, "RssAnon"))/1024, float64(memKiB(t, pid, "RssFile"))/1024)
}

// clockTicks is the kernel's USER_HZ (getconf CLK_TCK), 100 on Linux.
func clockTicks(t *testing.T) int64 {
	t.Helper()
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err != nil {
		return 100
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	if err != nil || v <= 0 {
		return 100
	}
	return v
}
