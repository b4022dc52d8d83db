// Package nodepull checks that pinwarden fetches signatures the way the node
// pulls images: the pinwarden agent binary runs on a real containerd (each
// supported line) with the node's credentials (a docker-credential-* helper,
// docker config auths, a kubelet credential provider plugin) and its hosts
// dir (private CA, pull-through mirror); its prefetcher has containerd pull
// each pin through CRI with the same credentials, and the agent judges the
// digest that containerd pulled, read back from its status API.
package nodepull

import (
	"flag"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
	"go.uber.org/goleak"
)

// agentBin is the pinwarden binary under test: $PINWARDEN_BIN (make test
// sets it), else one built by TestMain ("" under -short, where every test
// here is skipped).
var agentBin string

func TestMain(m *testing.M) {
	flag.Parse()
	var dir string
	if !testing.Short() {
		var err error
		if dir, err = os.MkdirTemp("", "pinwarden-nodepull-bin"); err != nil {
			log.Fatal(err)
		}
		if agentBin, err = harness.AgentBinary(dir); err != nil {
			_ = os.RemoveAll(dir)
			log.Fatal(err)
		}
	}
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
		goleak.Cleanup(func(int) {
			if dir != "" {
				_ = os.RemoveAll(dir)
			}
		}),
	)
}

const (
	user = "node-user"
	pass = "n0de-s3cret-pass"
)

// pulledDigest pulls ref through CRI with auth and returns the manifest
// digest containerd recorded for it.
func pulledDigest(t *testing.T, c *cri.Client, ref string, auth *cri.Auth) string {
	t.Helper()
	if _, err := c.PullImage(t.Context(), ref, auth); err != nil {
		t.Fatalf("containerd pull %s: %v", ref, err)
	}
	im, err := c.ImageStatus(t.Context(), ref)
	if err != nil || im == nil {
		t.Fatalf("image status %s: %v", ref, err)
	}
	for _, rd := range im.RepoDigests {
		if _, d, ok := strings.Cut(rd, "@"); ok {
			return d
		}
	}
	t.Fatalf("no repo digest for %s: %+v", ref, im)
	return ""
}

func startNode(t *testing.T) (*harness.Containerd, *cri.Client) {
	t.Helper()
	ctd := harness.StartContainerd(t)
	c, err := cri.Dial(t.Context(), ctd.Endpoint(), "k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return ctd, c
}

// TestNodePullsThroughMirror: containerd pulls through a pull-through
// mirror named in hosts.toml, as the agent's prefetcher asks it to, and the
// agent, reading the same file, judges the pulled digest via the mirror.
// Then the upstream stops: a second node (containerd and agent) still pulls
// the pin through the mirror, and its agent still verifies it.
func TestNodePullsThroughMirror(t *testing.T) {
	harness.SkipShort(t, "containerd, distribution and the agent binary")
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			upstream := harness.StartDistributionWith(t, harness.DistributionOptions{})
			signer := harness.NewSigner(t)
			img := harness.RandomImage(t, 1024)
			digest := harness.PushImage(t, upstream.Host+"/team/app:v1", img)
			// With an annotation, so that pinwarden fetches the signature
			// layer through the mirror (a plain cosign payload is rebuilt,
			// not fetched) and the mirror must keep it.
			signer.SignWith(t, upstream.Host+"/team/app", digest, harness.SignOptions{Annotations: map[string]any{"build": "42"}})
			mirror := harness.StartDistributionWith(t, harness.DistributionOptions{ProxyRemoteURL: "http://" + upstream.Host})
			hostsTOML := fmt.Sprintf("server = \"https://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", upstream.Host, mirror.Host)
			pin := upstream.Host + "/team/app:v1@" + digest
			policy := harness.KeyPolicy("node", upstream.Host+"/team/**", signer.PubPath)

			node := func() (*harness.Containerd, *harness.Agent) {
				ctd := harness.StartContainerd(t, harness.WithFlavour(f))
				ctd.WriteHostsTOML(upstream.Host, hostsTOML)
				return ctd, startPrefetchingAgent(t, ctd, policy, pin, nil)
			}
			_, a := node()
			if im := a.WaitVerdict(digest, 2*time.Minute); im.Verdict != "verified" {
				t.Fatalf("agent via the mirror: %+v", im)
			}
			wantPulled(t, a, 1)

			// The mirror stores what it served (manifests are blobs too).
			blobs := append(harness.SignatureLayers(t, upstream.Host+"/team/app", digest), digest, harness.ImageID(t, img))
			layers, err := img.Layers()
			if err != nil {
				t.Fatal(err)
			}
			for _, l := range layers {
				d, err := l.Digest()
				if err != nil {
					t.Fatal(err)
				}
				blobs = append(blobs, d.String())
			}
			for _, b := range blobs {
				mirror.WaitBlobStored(t, b)
			}
			upstream.Stop()

			_, a2 := node()
			if im := a2.WaitVerdict(digest, 2*time.Minute); im.Verdict != "verified" {
				t.Fatalf("second node, upstream stopped: %+v", im)
			}
			wantPulled(t, a2, 1)
		})
	}
}

// startPrefetchingAgent runs the agent binary on the node ctd, reading the
// node's hosts dir, with one policy, the pins (a pin file's text: one
// reference a line) prefetched, and the registry settings that regs sets
// (nil: none); env is added to the agent's environment.
func startPrefetchingAgent(t *testing.T, ctd *harness.Containerd, policy config.Policy, pins string, regs func(*config.Registries), env ...string) *harness.Agent {
	t.Helper()
	dir := t.TempDir()
	pinFile := filepath.Join(dir, "pins.txt")
	harness.WriteFile(t, pinFile, []byte(pins))
	cfg := harness.AgentConfig(ctd.Endpoint(), filepath.Join(dir, "state"))
	cfg.MetricsAddress, cfg.StatusAddress = harness.FreeAddr(t), harness.FreeAddr(t)
	cfg.Registries.ContainerdHostsDir = ctd.HostsDir()
	if regs != nil {
		regs(&cfg.Registries)
	}
	cfg.Policies = []config.Policy{policy}
	cfg.Pins = []string{pinFile}
	cfg.Prefetch.Enabled = true
	path := harness.WriteConfig(t, filepath.Join(dir, "config.yaml"), cfg)
	return harness.StartAgent(t, agentBin, path, cfg.MetricsAddress, cfg.StatusAddress, harness.WithAgentEnv(env...))
}

// wantPulled fails the test unless the agent's prefetcher has pulled n
// images (pinwarden_prefetch_total{result="pulled"}), so what the agent
// judged is what containerd pulled for it, not an image already there.
func wantPulled(t *testing.T, a *harness.Agent, n float64) {
	t.Helper()
	var got float64
	harness.Eventually(t, time.Minute, "prefetch pulls counted", func() (bool, string) {
		got = harness.SumMetric(a.Metrics(), "pinwarden_prefetch_total", `result="pulled"`)
		return got >= n, fmt.Sprintf("pinwarden_prefetch_total{result=\"pulled\"} = %v", got)
	})
	if got != n {
		t.Fatalf("pinwarden_prefetch_total{result=\"pulled\"} = %v, want %v", got, n)
	}
}

func ptr[T any](v T) *T { return &v }
