package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/pinwarden/pinwarden/agent"
	"github.com/pinwarden/pinwarden/agent/judge"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/agent/verify"
	"github.com/pinwarden/pinwarden/test/harness"
)

// latencyProxy is a reverse proxy in front of a registry that adds a
// delay to every request (a cloud registry's round trip) and counts them.
type latencyProxy struct {
	host  string
	delay atomic.Int64 // time.Duration
	n     atomic.Int64
}

func startLatencyProxy(t *testing.T, backend string) *latencyProxy {
	t.Helper()
	lp := &latencyProxy{}
	target, _ := url.Parse("http://" + backend)
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.Transport = &http.Transport{MaxIdleConnsPerHost: 64}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		lp.n.Add(1)
		if d := time.Duration(lp.delay.Load()); d > 0 {
			select { // the injected round trip, not a wait for a condition
			case <-time.After(d):
			case <-r.Context().Done():
				return
			}
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	lp.host = strings.TrimPrefix(srv.URL, "http://")
	return lp
}

// floor makes the minimal requests of a cold legacy verification for every
// digest, at the given parallelism, with a bare HTTP client, after one
// ping: the signature manifest by tag and, with layers, its layer. Without
// layers it is what pinwarden itself sends for a plain cosign payload
// (rebuilt, not fetched); with them, what a client that fetches every
// payload must at least do.
func floor(ctx context.Context, host string, repos, digests []string, parallel int, layers bool) (time.Duration, error) {
	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: parallel}}
	get := func(u, accept string) ([]byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return nil, err
		}
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		resp, err := c.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		out, err := io.ReadAll(resp.Body)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("GET %s: %s", u, resp.Status)
		}
		return out, nil
	}
	start := time.Now()
	if _, err := get("http://"+host+"/v2/", ""); err != nil {
		return 0, err
	}
	var g errgroup.Group
	g.SetLimit(parallel)
	for i := range digests {
		g.Go(func() error {
			tag := strings.Replace(digests[i], ":", "-", 1) + ".sig"
			m, err := get("http://"+host+"/v2/"+repos[i]+"/manifests/"+tag, "application/vnd.oci.image.manifest.v1+json")
			if err != nil {
				return err
			}
			var man struct {
				Layers []struct{ Digest string } `json:"layers"`
			}
			if err := json.Unmarshal(m, &man); err != nil || len(man.Layers) == 0 {
				return fmt.Errorf("signature manifest of %s: %v", digests[i], err)
			}
			if !layers {
				return nil
			}
			_, err = get("http://"+host+"/v2/"+repos[i]+"/blobs/"+man.Layers[0].Digest, "")
			return err
		})
	}
	err := g.Wait()
	return time.Since(start), err
}

// inProcess verifies refs with pinwarden's verifier and judge inside the
// benchmark process, cold (a new verifier, so a new ping), at parallel: the
// same work as `pinwarden verify` without its process start, measured
// where the floor is measured.
func inProcess(ctx context.Context, cfgPath string, refs []string, parallel int) (time.Duration, error) {
	s, err := agent.LoadSettings(cfgPath)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	v, err := agent.NewVerifier(s.Config, nil, func(o *verify.Options) { o.RegistryQPS = -1 })
	if err != nil {
		return 0, err
	}
	j := judge.New(s.Policies, v)
	var g errgroup.Group
	g.SetLimit(parallel)
	for _, r := range refs {
		g.Go(func() error {
			repo, digest, _ := strings.Cut(r, "@")
			if res := j.Judge(ctx, repo, digest); res.Verdict != verdict.Verified {
				return fmt.Errorf("%s: %s/%s: %s", r, res.Verdict, res.Reason, res.Detail)
			}
			return nil
		})
	}
	err = g.Wait()
	return time.Since(start), err
}

// TestVerifyDistribution: `pinwarden verify` of 50 signed images on Debian's
// distribution registry against a `cosign verify` loop, on loopback and with
// 20 ms added to every round trip by a latency proxy. On loopback also
// against the floor of a bare HTTP client making the same requests at the
// same parallelism (16), with pinwarden's verifier measured in the
// benchmark process like the floor, and as the whole CLI process.
// Requests per verification are counted at the proxy. The images are signed
// under the proxy's name: the name the node pulls them by.
func TestVerifyDistribution(t *testing.T) {
	gate(t)
	const n, parallel = 50, 16
	reg := harness.StartDistributionWith(t, harness.DistributionOptions{})
	lp := startLatencyProxy(t, reg.Host)
	s := harness.NewSigner(t)
	repos := make([]string, n)
	digests := make([]string, n)
	refs := make([]string, n)
	for i := range n {
		repos[i] = fmt.Sprintf("bench/app-%d", i)
		digests[i] = harness.PushRandomImage(t, fmt.Sprintf("%s/%s:v1", reg.Host, repos[i]), 1024)
		s.SignWith(t, reg.Host+"/"+repos[i], digests[i], harness.SignOptions{As: lp.host + "/" + repos[i]})
		refs[i] = lp.host + "/" + repos[i] + "@" + digests[i]
	}
	cosign := harness.RequireBinary(t, "cosign")
	runs := envInt("PINWARDEN_BENCH_VERIFY_RUNS", 5)
	cosignRuns := envInt("PINWARDEN_BENCH_COSIGN_RUNS", 1)
	dir := t.TempDir()
	c := benchConfig(t, "unix:///nonexistent.sock", dir, lp.host+"/bench/**", s.PubPath, lp.host)
	c.MetricsAddress, c.StatusAddress = "", ""
	cfg := writeConfig(t, dir, c)
	for _, delay := range []time.Duration{0, 20 * time.Millisecond} {
		lp.delay.Store(int64(delay))
		label := "loopback"
		if delay > 0 {
			label = fmt.Sprintf("+%d ms round trips", delay/time.Millisecond)
		}
		var pw []time.Duration
		var reqs float64
		for range runs {
			before := lp.n.Load()
			cmd := exec.Command(pinwardenBin(t), append([]string{"verify", "--config", cfg, "--output", "json", "--parallel", strconv.Itoa(parallel)}, refs...)...)
			start := time.Now()
			out, err := cmd.CombinedOutput()
			took := time.Since(start)
			if err != nil {
				t.Fatalf("pinwarden verify (%s): %v\n%s", label, err, out)
			}
			pw = append(pw, took)
			reqs = float64(lp.n.Load()-before) / n
		}
		script := `for r in "$@"; do "$COSIGN" verify --key "$KEY" --insecure-ignore-tlog=true --allow-insecure-registry --allow-http-registry "$r" >/dev/null 2>"$ERR" || { cat "$ERR"; exit 1; }; done`
		var cs []time.Duration
		for range cosignRuns {
			cmd := exec.Command("bash", append([]string{"-c", script, "loop"}, refs...)...)
			cmd.Env = append(os.Environ(), "COSIGN="+cosign, "KEY="+s.PubPath, "ERR="+filepath.Join(dir, "cosign.err"),
				"COSIGN_EXPERIMENTAL=0", "TUF_ROOT="+filepath.Join(dir, "tuf"))
			start := time.Now()
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("cosign verify loop (%s): %v\n%s", label, err, out)
			}
			cs = append(cs, time.Since(start))
		}
		pm, cm := median(pw), median(cs)
		record(t, fmt.Sprintf("`pinwarden verify` of %d signed images, distribution, %s, wall, median of %d", n, label, runs), ms(pm), "", "")
		record(t, fmt.Sprintf("`cosign verify --key` loop over the same %d images, distribution, %s, wall, median of %d", n, label, cosignRuns), ms(cm), "", "")
		ratio := float64(cm) / float64(pm)
		if delay > 0 {
			record(t, "speed-up pinwarden verify vs cosign loop, distribution, "+label, fmt.Sprintf("%.1fx", ratio), ">= 50x", verdictMet(ratio >= 50))
		} else {
			record(t, "speed-up pinwarden verify vs cosign loop, distribution, "+label, fmt.Sprintf("%.1fx", ratio), "", "")
		}
		record(t, "registry requests per verification (`pinwarden verify`, distribution, "+label+", one ping per run included)",
			fmt.Sprintf("%.2f", reqs), "<= 2", verdictMet(reqs <= 2))
		if delay > 0 {
			continue
		}
		// Interleaved, so that the machine's drift hits all alike.
		var fl, fl2, ip []time.Duration
		for range runs {
			d, err := floor(t.Context(), lp.host, repos, digests, parallel, false)
			if err != nil {
				t.Fatal(err)
			}
			fl = append(fl, d)
			if d, err = floor(t.Context(), lp.host, repos, digests, parallel, true); err != nil {
				t.Fatal(err)
			}
			fl2 = append(fl2, d)
			if d, err = inProcess(t.Context(), cfg, refs, parallel); err != nil {
				t.Fatal(err)
			}
			ip = append(ip, d)
		}
		fm, fm2, im := median(fl), median(fl2), median(ip)
		record(t, fmt.Sprintf("bare HTTP client floor, pinwarden's requests (ping + signature manifest per image), parallel %d, distribution, loopback, median of %d", parallel, runs), ms(fm), "", "")
		record(t, fmt.Sprintf("bare HTTP client floor, ping + signature manifest + layer per image, parallel %d, distribution, loopback, median of %d", parallel, runs), ms(fm2), "", "")
		record(t, fmt.Sprintf("pinwarden verifier in the benchmark process (cold: new verifier, ping), parallel %d, distribution, loopback, median of %d", parallel, runs), ms(im), "", "")
		r := float64(im) / float64(fm)
		record(t, "pinwarden verifier / floor of the same requests, loopback, both in the benchmark process", fmt.Sprintf("%.2fx", r), "<= 1.3x", verdictMet(r <= 1.3))
		record(t, "`pinwarden verify` (whole CLI process, with its start) / floor of the same requests, loopback", fmt.Sprintf("%.2fx", float64(pm)/float64(fm)), "", "")
		record(t, "`pinwarden verify` (whole CLI process) / floor with layers (what a client that fetches each payload needs), loopback", fmt.Sprintf("%.2fx", float64(pm)/float64(fm2)), "", "")
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
