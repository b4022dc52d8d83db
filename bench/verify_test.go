package bench

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"github.com/pinwarden/pinwarden/test/harness"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/sigstore/sigstore/pkg/cryptoutils"

	"github.com/pinwarden/pinwarden/agent/cache"
	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/judge"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// TestVerifyCLI: `pinwarden verify` of 50 signed images on a loopback
// registry against a shell loop of `cosign verify --key` over the same 50
// digests, in the same run (issue 3: >= 50x), and the registry requests
// each cold verification costs (<= 3).
func TestVerifyCLI(t *testing.T) {
	gate(t)
	const n = 50
	dir := t.TempDir()
	reg := harness.StartCountingRegistry(t)
	s := harness.NewSigner(t)
	refs := make([]string, n)
	for i := range n {
		refs[i] = pushSigned(t, s, fmt.Sprintf("%s/bench/app-%d:v1", reg.Host, i)).String()
	}
	c := benchConfig(t, "unix:///nonexistent.sock", dir, reg.Host+"/bench/**", s.PubPath, reg.Host)
	c.MetricsAddress, c.StatusAddress = "", ""
	cfg := writeConfig(t, dir, c)

	runs := 5
	if v, err := strconv.Atoi(os.Getenv("PINWARDEN_BENCH_VERIFY_RUNS")); err == nil && v > 0 {
		runs = v
	}
	pwVerify := func(cfg string) ([]time.Duration, []float64) {
		var took []time.Duration
		var reqs []float64
		for range runs {
			before := reg.Requests()
			cmd := exec.Command(pinwardenBin(t), append([]string{"verify", "--config", cfg, "--output", "json"}, refs...)...)
			start := time.Now()
			out, err := cmd.CombinedOutput()
			d := time.Since(start)
			if err != nil {
				t.Fatalf("pinwarden verify: %v\n%s", err, out)
			}
			took = append(took, d)
			reqs = append(reqs, float64(reg.Requests()-before)/n)
		}
		t.Logf("pinwarden verify --config %s: %v", filepath.Base(filepath.Dir(cfg)), took)
		return took, reqs
	}
	pw, reqs := pwVerify(cfg)

	cosign := harness.RequireBinary(t, "cosign")
	// The shell loop a user would write; cosign's exit status is checked.
	script := `for r in "$@"; do "$COSIGN" verify --key "$KEY" --insecure-ignore-tlog=true --allow-insecure-registry --allow-http-registry "$r" >/dev/null 2>"$ERR" || { cat "$ERR"; exit 1; }; done`
	cosignRuns := 3
	if v, err := strconv.Atoi(os.Getenv("PINWARDEN_BENCH_COSIGN_RUNS")); err == nil && v > 0 {
		cosignRuns = v
	}
	var cs []time.Duration
	var cosignReqs float64
	for range cosignRuns {
		before := reg.Requests()
		cmd := exec.Command("bash", append([]string{"-c", script, "loop"}, refs...)...)
		cmd.Env = append(os.Environ(), "COSIGN="+cosign, "KEY="+s.PubPath, "ERR="+filepath.Join(dir, "cosign.err"),
			"COSIGN_EXPERIMENTAL=0", "TUF_ROOT="+filepath.Join(dir, "tuf"))
		start := time.Now()
		out, err := cmd.CombinedOutput()
		took := time.Since(start)
		if err != nil {
			t.Fatalf("cosign verify loop: %v\n%s", err, out)
		}
		cs = append(cs, took)
		t.Logf("cosign loop: %s", took)
		cosignReqs = float64(reg.Requests()-before) / n
	}
	pm, cm := median(pw), median(cs)
	ratio := float64(cm) / float64(pm)
	record(t, fmt.Sprintf("`pinwarden verify` of %d signed images (loopback registry, `--parallel 16`), wall, median of %d", n, runs), ms(pm), "", "")
	record(t, fmt.Sprintf("shell loop of `cosign verify --key` over the same %d images, wall, median of %d", n, cosignRuns), ms(cm), "", "")
	record(t, "speed-up pinwarden verify vs cosign loop (same run)", fmt.Sprintf("%.1fx", ratio), ">= 50x", verdictMet(ratio >= 50))
	slices.Sort(reqs)
	rq := reqs[len(reqs)/2]
	record(t, "registry requests per cold verification (`pinwarden verify`, counted by middleware, by digest)",
		fmt.Sprintf("%.2f", rq), "<= 3", verdictMet(rq <= 3))
	record(t, "registry requests per verification (cosign CLI, for comparison)", fmt.Sprintf("%.2f", cosignReqs), "", "")
}

// BenchmarkJudgeCacheHit is the whole verdict path a relist or event takes
// for a digest the cache knows: policy match on the repository plus the
// cache lookup (issue 3: <= 1 µs). Guards against e.g. a policy match that
// recompiles globs or a cache hit that touches bbolt.
func BenchmarkJudgeCacheHit(b *testing.B) {
	dir := b.TempDir()
	key := filepath.Join(dir, "k.pub")
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	pem, err := cryptoutils.MarshalPublicKeyToPEM(priv.Public())
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(key, pem, 0o600); err != nil {
		b.Fatal(err)
	}
	cfg, err := config.Parse([]byte(`policies:
  - {name: other, images: ["other.example/**"], deny: true}
  - {name: bench, images: ["registry.example/bench/**"], keys: [`+key+`]}
`), dir)
	if err != nil {
		b.Fatal(err)
	}
	set, err := policy.Compile(cfg)
	if err != nil {
		b.Fatal(err)
	}
	fp := set.Policies[1].Fingerprint
	const n = 10000
	digests := make([]string, n)
	w, err := cache.Open(b.Context(), cache.PathIn(dir))
	if err != nil {
		b.Fatal(err)
	}
	for i := range n {
		digests[i] = fmt.Sprintf("sha256:%064x", i)
		w.Put(verdict.Result{Digest: digests[i], Verdict: verdict.Verified, Policy: "bench", Fingerprint: fp,
			Signers: []string{"sha256:k"}, VerifiedAt: time.Now()}, time.Hour)
	}
	// Close flushes the background disk writes; the agent at start-up
	// reopens a warm cache the same way.
	if err := w.Close(); err != nil {
		b.Fatal(err)
	}
	c, err := cache.Open(b.Context(), cache.PathIn(dir))
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	j := judge.New(set, nil, judge.WithCache(c, time.Hour, time.Minute))
	ctx := b.Context()
	b.ReportAllocs()
	b.ResetTimer()
	i := 0
	for b.Loop() {
		if r := j.Judge(ctx, "registry.example/bench/app", digests[i%n]); r.Verdict != verdict.Verified {
			b.Fatalf("got %s", r.Verdict)
		}
		i++
	}
}
