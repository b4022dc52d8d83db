package prefetch_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/judge"
	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/prefetch"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/agent/verify"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// node is a real containerd, a CRI client, and a judge whose one policy
// requires the signer's key for every image of the registries.
type node struct {
	ctd    *harness.Containerd
	c      *cri.Client
	judge  *judge.Judge
	signer *harness.Signer
}

func newNode(t *testing.T, f harness.Flavour, hosts ...string) *node {
	t.Helper()
	n := harness.StartNode(t, harness.WithFlavour(f), harness.WithInsecureRegistry(hosts...))
	ctd, c := n.Containerd, n.CRI
	s := harness.NewSigner(t)
	c0 := harness.AgentConfig(ctd.Endpoint(), t.TempDir())
	c0.Registries.Insecure = hosts
	pol := config.Policy{Name: "signed", Keys: []string{s.PubPath}}
	for _, h := range hosts {
		pol.Images = append(pol.Images, h+"/**")
	}
	c0.Policies = []config.Policy{pol}
	cfg := harness.Parsed(t, c0)
	set, err := policy.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	v, err := verify.New(verify.Options{Registries: cfg.Registries, RequestTimeout: 3 * time.Second, Retries: -1})
	if err != nil {
		t.Fatal(err)
	}
	return &node{ctd: ctd, c: c, judge: judge.New(set, v), signer: s}
}

// push pushes a random image of size bytes to host/repo:v1, signs it when
// signed, and returns its pin.
func (n *node) push(t *testing.T, host, repo string, size int, signed bool) pins.Pin {
	t.Helper()
	d := harness.PushRandomImage(t, host+"/"+repo+":v1", size)
	if signed {
		n.signer.Sign(t, host+"/"+repo, d)
	}
	p, err := pins.ParseReference(host + "/" + repo + ":v1@" + d)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (n *node) present(t *testing.T, p pins.Pin) *cri.Image {
	t.Helper()
	st, err := n.c.ImageStatus(t.Context(), p.Ref())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// waitPresent waits until p is on the node.
func (n *node) waitPresent(t *testing.T, p pins.Pin) {
	t.Helper()
	harness.Eventually(t, 60*time.Second, p.String()+" prefetched", func() (bool, string) {
		return n.present(t, p) != nil, "not on the node"
	})
}

// TestIntegrationSignedPulledUnsignedNot: against real containerd (both
// lines), a real registry and real cosign signatures: the signed pin is
// pulled and present by digest (and labelled pinned), the unsigned pin is
// never pulled, and a second run finds the signed one present.
func TestIntegrationSignedPulledUnsignedNot(t *testing.T) {
	t.Parallel()
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			t.Parallel()
			reg := harness.StartRegistry(t)
			n := newNode(t, f, reg)
			signed := n.push(t, reg, "shop/api", 4096, true)
			unsigned := n.push(t, reg, "shop/evil", 4096, false)
			rec := &recorder{}
			pf := prefetch.New(n.judge, n.c, nil, prefetch.Options{PinGC: true, Observer: rec, Events: rec, RetryBase: 10 * time.Millisecond})
			out := pf.Once(t.Context(), []pins.Pin{signed, unsigned}, nil)
			if out[0].Result != prefetch.ResultPulled || out[0].Verdict != verdict.Verified {
				t.Errorf("signed: %+v", out[0])
			}
			if out[1].Result != prefetch.ResultRejected || out[1].Verdict != verdict.Unverified || out[1].Reason != verdict.ReasonNoSignature {
				t.Errorf("unsigned: %+v", out[1])
			}
			st := n.present(t, signed)
			if st == nil || st.ID != out[0].ImageID {
				t.Fatalf("ImageStatus(%s) = %+v, want image %s", signed.Ref(), st, out[0].ImageID)
			}
			if st := n.present(t, unsigned); st != nil {
				t.Errorf("unsigned pin is on the node: %+v", st)
			}
			if imgs, err := n.c.ImageTargets(t.Context()); err != nil {
				t.Fatal(err)
			} else {
				for name, target := range imgs {
					if target == unsigned.Digest || strings.Contains(name, "shop/evil") {
						t.Errorf("containerd holds %s -> %s of the unsigned pin", name, target)
					}
				}
			}
			labels, err := n.c.ImageLabels(t.Context(), signed.Ref())
			if err != nil {
				t.Fatal(err)
			}
			if labels[cri.LabelPinned] != cri.LabelPinnedValue {
				t.Errorf("labels of %s = %v, want %s=%s", signed.Ref(), labels, cri.LabelPinned, cri.LabelPinnedValue)
			}
			again := pf.Once(t.Context(), []pins.Pin{signed}, nil)
			if again[0].Result != prefetch.ResultPresent {
				t.Errorf("second run: %+v, want present", again[0])
			}
			res, _, evs := rec.snapshot()
			if res[prefetch.ResultPulled] != 1 || res[prefetch.ResultRejected] != 1 || res[prefetch.ResultPresent] != 1 {
				t.Errorf("metrics %v", res)
			}
			if len(evs) != 2 {
				t.Errorf("events %v, want one Normal ImagePrefetched and one Warning ImagePrefetchFailed", evs)
			}
		})
	}
}

// TestIntegrationPinGCOff: with pinGC false the pulled image carries no
// pinned label.
func TestIntegrationPinGCOff(t *testing.T) {
	t.Parallel()
	reg := harness.StartRegistry(t)
	n := newNode(t, harness.Containerd2, reg)
	p := n.push(t, reg, "shop/nopin", 2048, true)
	pf := prefetch.New(n.judge, n.c, nil, prefetch.Options{PinGC: false})
	if out := pf.Once(t.Context(), []pins.Pin{p}, nil); out[0].Result != prefetch.ResultPulled {
		t.Fatalf("%+v", out[0])
	}
	labels, err := n.c.ImageLabels(t.Context(), p.Ref())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := labels[cri.LabelPinned]; ok {
		t.Errorf("labels %v carry %s with pinGC off", labels, cri.LabelPinned)
	}
}

// TestIntegrationRunLive: Run on real containerd picks up a pin added with
// SetPins without a restart, and a pin whose registry is down (stopped after
// the push) stays pending: retried, never pulled.
func TestIntegrationRunLive(t *testing.T) {
	t.Parallel()
	reg := harness.StartRegistry(t)
	down := harness.StartCountingRegistry(t)
	n := newNode(t, harness.Containerd2, reg, down.Host)
	first := n.push(t, reg, "live/one", 2048, true)
	later := n.push(t, reg, "live/two", 2048, true)
	outage := n.push(t, down.Host, "live/outage", 2048, true)
	down.Close() // the registry goes away after the image was signed

	rec := &recorder{}
	j := &countingJudge{Judger: n.judge}
	pf := prefetch.New(j, n.c, nil, prefetch.Options{PinGC: true, Observer: rec, Events: rec,
		RetryBase: 100 * time.Millisecond, RetryMax: 400 * time.Millisecond})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- pf.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	}()

	pf.SetPins([]pins.Pin{first, outage})
	n.waitPresent(t, first)
	pf.SetPins([]pins.Pin{first, outage, later}) // what a config reload does
	n.waitPresent(t, later)

	// The image of `later` is on the node before the prefetcher records
	// its attempt (it labels the image against GC first), so the metrics
	// are read once both pulls and three failed attempts are recorded:
	// the pending gauge then counts the outage pin alone. (Read at once,
	// under load it could still count `later`: the test was wrong, not
	// the gauge.)
	var (
		res     map[string]int
		pending int
		evs     []string
	)
	harness.Eventually(t, 60*time.Second, "both pulls and three failed attempts recorded, one pin pending", func() (bool, string) {
		res, pending, evs = rec.snapshot()
		return res[prefetch.ResultPulled] == 2 && res[prefetch.ResultFailed] >= 3 && pending == 1 && j.calls(outage.Digest) >= 3,
			fmt.Sprintf("metrics %v, pending gauge %d, outage judged %d times", res, pending, j.calls(outage.Digest))
	})
	if st := n.present(t, outage); st != nil {
		t.Errorf("pin of a stopped registry is on the node: %+v", st)
	}
	r := n.judge.Judge(t.Context(), outage.Repo, outage.Digest)
	if r.Verdict != verdict.Pending || r.Reason != verdict.ReasonRegistryUnreachable {
		t.Errorf("verdict of the outage pin = %s/%s, want pending/registry-unreachable", r.Verdict, r.Reason)
	}
	warnings := 0
	for _, e := range evs {
		if e == "Warning ImagePrefetchFailed" {
			warnings++
		}
	}
	if warnings != 1 {
		t.Errorf("events %v: want one warning for the outage however often it is retried", evs)
	}
}

// countingJudge counts judgements per digest.
type countingJudge struct {
	prefetch.Judger
	mu sync.Mutex
	n  map[string]int
}

func (c *countingJudge) Judge(ctx context.Context, repo, digest string) verdict.Result {
	c.mu.Lock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	c.n[digest]++
	c.mu.Unlock()
	return c.Judger.Judge(ctx, repo, digest)
}

func (c *countingJudge) calls(digest string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[digest]
}

// TestIntegrationConcurrencyBounded: with concurrency 2, the registry never
// sees more than 2 images being verified or pulled at once (and does see 2).
func TestIntegrationConcurrencyBounded(t *testing.T) {
	t.Parallel()
	reg := harness.StartCountingRegistry(t, harness.WithBlobDelay(100*time.Millisecond))
	n := newNode(t, harness.Containerd2, reg.Host)
	var ps []pins.Pin
	for i := range 6 {
		ps = append(ps, n.push(t, reg.Host, fmt.Sprintf("conc/img%d", i), 2048, true))
	}
	reg.ResetMaxInFlight()
	pf := prefetch.New(n.judge, n.c, nil, prefetch.Options{Concurrency: 2})
	for _, o := range pf.Once(t.Context(), ps, nil) {
		if o.Result != prefetch.ResultPulled {
			t.Errorf("%s: %s %s %s", o.Pin, o.Result, o.Reason, o.Detail)
		}
	}
	if got := reg.MaxInFlight(); got != 2 {
		t.Errorf("at most %d images in flight at the registry, want exactly 2 (concurrency 2)", got)
	}
}
