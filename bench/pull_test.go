package bench

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/test/harness"
)

// TestPullToVerdict: the real agent against a private containerd 2.x and a
// loopback registry; per CRI pull of a distinct signed image, the time from
// PullImage returning to the digest's verdict showing on GET /v1/images,
// cold (verified against the registry) and warm (from the agent's cache)
// (issue 4: p99 <= 100 ms cold, <= 20 ms warm).
func TestPullToVerdict(t *testing.T) {
	gate(t)
	n := 100
	if v, err := strconv.Atoi(os.Getenv("PINWARDEN_BENCH_PULLS")); err == nil && v > 0 {
		n = v
	}
	dir := t.TempDir()
	reg := harness.StartCountingRegistry(t)
	s := harness.NewSigner(t)
	ctd := harness.StartContainerd(t, harness.WithFlavour(harness.Containerd2), harness.WithInsecureRegistry(reg.Host))
	refs := make([]string, n)
	digests := make([]string, n)
	for i := range n {
		refs[i] = fmt.Sprintf("%s/bench/pull-%d:v1", reg.Host, i)
		digests[i] = pushSigned(t, s, refs[i]).DigestStr()
	}
	c := benchConfig(t, ctd.Endpoint(), dir, reg.Host+"/bench/**", s.PubPath, reg.Host)
	a := startAgent(t, c, writeConfig(t, dir, c))
	a.WaitReady(30 * time.Second)
	rt := harness.DialCRI(t, ctd)

	ids := make([]string, n) // image IDs (config digests) as CRI reports them
	// pullAll pulls every image in turn and returns the pull->verdict latencies.
	pullAll := func(phase string) []time.Duration {
		lat := make([]time.Duration, 0, n)
		for i := range n {
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			id, err := rt.PullImage(ctx, refs[i], nil)
			ids[i] = id
			if err != nil {
				cancel()
				t.Fatalf("%s: %v", phase, err)
			}
			if os.Getenv("PINWARDEN_BENCH_TRACE") != "" {
				t.Logf("pulled %s: digest %s, image ID %s", refs[i], digests[i], id)
			}
			start := time.Now()
			for {
				v := verdictOf(ctx, a, digests[i])
				if v == verdict.Verified {
					break
				}
				if v != "" && v != verdict.Pending {
					cancel()
					t.Fatalf("%s: %s got verdict %s", phase, refs[i], v)
				}
				if ctx.Err() != nil {
					cancel()
					t.Fatalf("%s: no verdict for %s within a minute", phase, refs[i])
				}
				time.Sleep(time.Millisecond)
			}
			lat = append(lat, time.Since(start))
			cancel()
		}
		return lat
	}

	// spurious counts the requests that name an image ID (a config digest)
	// rather than a manifest digest: signatures looked up for the wrong digest.
	spurious := func(paths []string) int {
		k := 0
		for _, p := range paths {
			for _, id := range ids {
				if _, hex, ok := strings.Cut(id, ":"); ok && strings.Contains(p, hex) {
					k++
					break
				}
			}
		}
		return k
	}
	before := reg.PinwardenRequests()
	coldStart := time.Now()
	cold := pullAll("cold")
	coldRate := float64(n) / time.Since(coldStart).Seconds()
	perVerification := float64(reg.PinwardenRequests()-before) / float64(n)
	coldSpurious := spurious(reg.PinwardenPaths())

	// Remove every image and wait until the agent has forgotten them, so
	// that the warm pulls see a new digest whose verdict only the cache has.
	for _, r := range refs {
		if err := rt.RemoveImage(t.Context(), r); err != nil {
			t.Fatalf("remove %s: %v", r, err)
		}
	}
	harness.Eventually(t, time.Minute, "the agent to forget the removed images", func() (bool, string) {
		imgs, err := a.TryImages(t.Context())
		return err == nil && len(imgs) == 0, fmt.Sprintf("%d images listed (%v)", len(imgs), err)
	})
	before = reg.PinwardenRequests()
	nPaths := len(reg.PinwardenPaths())
	warm := pullAll("warm")
	warmReqs := reg.PinwardenRequests() - before
	warmSpurious := spurious(reg.PinwardenPaths()[nPaths:])
	if warmReqs > 0 {
		t.Logf("agent requests during the warm pulls: %q", reg.PinwardenPaths()[nPaths:])
	}

	cp50, cp99 := percentile(cold, 50), percentile(cold, 99)
	wp50, wp99 := percentile(warm, 50), percentile(warm, 99)
	record(t, fmt.Sprintf("pull -> verdict on /v1/images, cold (registry), %d pulls back to back (%.1f pulls/s): p50 / p99", n, coldRate),
		ms(cp50)+" / "+ms(cp99), "p99 <= 100 ms", verdictMet(cp99 <= 100*time.Millisecond))
	record(t, fmt.Sprintf("pull -> verdict on /v1/images, warm (agent cache), %d pulls: p50 / p99", n),
		ms(wp50)+" / "+ms(wp99), "p99 <= 20 ms", verdictMet(wp99 <= 20*time.Millisecond))
	record(t, fmt.Sprintf("registry requests by the agent per cold pull (pinwarden User-Agent; of all %d cold requests, %d name an image ID instead of the manifest digest)",
		int(perVerification*float64(n)+0.5), coldSpurious),
		fmt.Sprintf("%.2f", perVerification), "<= 3", verdictMet(perVerification <= 3))
	record(t, fmt.Sprintf("registry requests by the agent during the warm pulls (%d of them name an image ID)", warmSpurious),
		strconv.FormatInt(warmReqs, 10), "0", verdictMet(warmReqs == 0))
}

// verdictOf returns the verdict /v1/images shows for digest, or "" when the
// digest is not listed (or the agent did not answer).
func verdictOf(ctx context.Context, a *harness.Agent, digest string) verdict.Verdict {
	imgs, err := a.TryImages(ctx)
	if err != nil {
		return ""
	}
	for _, im := range imgs {
		if im.Digest == digest {
			return im.Verdict
		}
	}
	return ""
}
