package inventory_test

import (
	"context"
	"encoding/json"
	"os/exec"
	"slices"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// node is one real containerd with a registry and a CRI client.
type node struct {
	reg string
	ctd *harness.Containerd
	c   *cri.Client
}

func newNode(t *testing.T, f harness.Flavour) *node {
	t.Helper()
	n := harness.StartNode(t, harness.WithFlavour(f))
	return &node{reg: n.Registry.Host, ctd: n.Containerd, c: n.CRI}
}

// push pushes a random image to ref and pulls it through CRI.
func (n *node) pushPull(t *testing.T, ref string) (digest, id string) {
	t.Helper()
	digest = harness.PushRandomImage(t, ref, 2048)
	return digest, n.pull(t, ref)
}

func (n *node) pull(t *testing.T, ref string) string {
	t.Helper()
	id, err := n.c.PullImage(t.Context(), ref, nil)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestIntegrationMatchesCrictl: the inventory equals what crictl reports for
// the same containerd.
func TestIntegrationMatchesCrictl(t *testing.T) {
	crictlBin := harness.RequireBinary(t, "crictl")
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			n := newNode(t, f)
			n.pushPull(t, n.reg+"/shop/api:v1")
			n.pushPull(t, n.reg+"/shop/api:v2")
			d3, _ := n.pushPull(t, n.reg+"/shop/worker:v1")
			n.pull(t, n.reg+"/shop/worker@"+d3)
			// One image ID under two manifest digests: same config and
			// layer, manifests differing by an annotation.
			img := harness.RandomImage(t, 1024)
			harness.PushImage(t, n.reg+"/a/same:v1", img)
			harness.PushImage(t, n.reg+"/b/same:v1", mutate.Annotations(img, map[string]string{"x": "y"}).(v1.Image))
			n.pull(t, n.reg+"/a/same:v1")
			n.pull(t, n.reg+"/b/same:v1")
			// A tag that moved leaves its old digest untagged.
			n.pushPull(t, n.reg+"/shop/api:v2")

			inv := n.readyInventory(t)

			out, err := exec.CommandContext(t.Context(), crictlBin, "--runtime-endpoint", n.ctd.Endpoint(),
				"--image-endpoint", n.ctd.Endpoint(), "images", "--digests", "-o", "json").Output()
			if err != nil {
				t.Fatalf("crictl: %v", err)
			}
			var cl struct {
				Images []struct {
					ID          string   `json:"id"`
					RepoTags    []string `json:"repoTags"`
					RepoDigests []string `json:"repoDigests"`
					Size        string   `json:"size"`
				} `json:"images"`
			}
			if err := json.Unmarshal(out, &cl); err != nil {
				t.Fatalf("crictl json: %v\n%s", err, out)
			}

			if len(cl.Images) < 5 {
				t.Fatalf("crictl lists %d images, want at least the 5 pulled:\n%s", len(cl.Images), out)
			}
			// Fold the inventory back into crictl's shape: per image ID,
			// its tags and repo digests.
			type view struct{ tags, digests []string }
			fromInv := map[string]*view{}
			for _, im := range inv.Snapshot() {
				v := fromInv[im.ImageID]
				if v == nil {
					v = &view{}
					fromInv[im.ImageID] = v
				}
				v.tags = append(v.tags, im.Tags...)
				for _, r := range im.Repos {
					v.digests = append(v.digests, r+"@"+im.Digest)
				}
			}
			if len(fromInv) != len(cl.Images) {
				t.Errorf("inventory has %d image IDs, crictl %d", len(fromInv), len(cl.Images))
			}
			for _, ci := range cl.Images {
				v := fromInv[ci.ID]
				if v == nil {
					t.Errorf("crictl image %s missing from the inventory", ci.ID)
					continue
				}
				sort.Strings(v.tags)
				sort.Strings(v.digests)
				sort.Strings(ci.RepoTags)
				sort.Strings(ci.RepoDigests)
				if !slices.Equal(v.tags, ci.RepoTags) || !slices.Equal(v.digests, ci.RepoDigests) {
					t.Errorf("image %s: inventory tags %v digests %v; crictl tags %v digests %v",
						ci.ID, v.tags, v.digests, ci.RepoTags, ci.RepoDigests)
				}
			}
			// The tags of the shared-ID image went to their own digests.
			for _, tag := range []string{n.reg + "/a/same:v1", n.reg + "/b/same:v1"} {
				dg, ok := inv.DigestForTag(tag)
				if !ok {
					t.Errorf("no digest for %s", tag)
					continue
				}
				im, _ := inv.Get(dg)
				if !slices.Equal(im.Tags, []string{tag}) {
					t.Errorf("%s -> %s whose tags are %v", tag, dg, im.Tags)
				}
			}
		})
	}
}

// TestIntegrationPullLatency: a CRI pull shows up in a running inventory
// from its event (no relist runs: the resync interval is an hour), and the
// latency is logged. The deadline is generous: a loaded machine under -race
// must not fail it; the e2e tests and bench/ measure the latency.
func TestIntegrationPullLatency(t *testing.T) {
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			n := newNode(t, f)
			rec := newRecorder()
			inv := inventory.New(n.c, nil, inventory.WithObserver(rec), inventory.WithResyncInterval(time.Hour))
			start(t, inv)
			eventually(t, 30*time.Second, "ready", inv.Ready)
			var lat []time.Duration
			for i := range 5 {
				ref := n.reg + "/lat/img:v" + string(rune('0'+i))
				digest := harness.PushRandomImage(t, ref, 2048)
				n.pull(t, ref)
				pulled := time.Now()
				eventually(t, 30*time.Second, "pulled image in the inventory", func() bool {
					dg, ok := inv.DigestForTag(ref)
					return ok && dg == digest
				})
				lat = append(lat, time.Since(pulled))
			}
			if got := rec.resyncs(); got != 1 {
				t.Errorf("%d relists, want only the first: the pulls must come from events", got)
			}
			slices.Sort(lat)
			t.Logf("%s pull-to-inventory latency over %d pulls: min %v median %v max %v",
				f.Name, len(lat), lat[0], lat[len(lat)/2], lat[len(lat)-1])
		})
	}
}

// TestIntegrationTagMove: re-pushing a tag to a new digest and pulling it
// moves the tag in the inventory.
func TestIntegrationTagMove(t *testing.T) {
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			n := newNode(t, f)
			inv := n.readyInventory(t)
			ref := n.reg + "/shop/api:v1"
			d1, _ := n.pushPull(t, ref)
			eventually(t, 30*time.Second, "first digest", func() bool { dg, _ := inv.DigestForTag(ref); return dg == d1 })
			d2, _ := n.pushPull(t, ref)
			eventually(t, 30*time.Second, "tag moved", func() bool { dg, _ := inv.DigestForTag(ref); return dg == d2 })
			eventually(t, 30*time.Second, "old digest untagged", func() bool {
				im, ok := inv.Get(d1)
				return ok && len(im.Tags) == 0
			})
			if im, _ := inv.Get(d2); !slices.Equal(im.Tags, []string{ref}) {
				t.Errorf("new digest tags = %v", im.Tags)
			}
		})
	}
}

// TestIntegrationRestart: containerd is killed and restarted; the inventory
// sees it go down and up, and finds an image pulled while it was
// disconnected.
func TestIntegrationRestart(t *testing.T) {
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			n := newNode(t, f)
			rec := newRecorder()
			// A 2 s backoff base leaves room to pull before it reconnects.
			inv := inventory.New(n.c, nil, inventory.WithObserver(rec), inventory.WithBackoff(2*time.Second, 4*time.Second))
			start(t, inv)
			eventually(t, 30*time.Second, "ready", inv.Ready)
			before, _ := n.pushPull(t, n.reg+"/r/before:v1")
			eventually(t, 30*time.Second, "image before restart", func() bool { _, ok := inv.Get(before); return ok })

			killed := time.Now()
			n.ctd.Kill()
			eventually(t, 30*time.Second, "runtime down", func() bool { return !inv.RuntimeUp() })
			detect := time.Since(killed)

			restarted := time.Now()
			n.ctd.Start()
			// Pull with a separate client while the inventory is still
			// disconnected.
			other := harness.DialCRI(t, n.ctd)
			ref := n.reg + "/r/during:v1"
			during := harness.PushRandomImage(t, ref, 2048)
			if _, err := other.PullImage(t.Context(), ref, nil); err != nil {
				t.Fatal(err)
			}
			if inv.RuntimeUp() {
				t.Log("inventory reconnected before the pull finished; the pull was not during the outage")
			}
			eventually(t, 30*time.Second, "image pulled during the outage", func() bool { _, ok := inv.Get(during); return ok })
			eventually(t, 30*time.Second, "runtime up", inv.RuntimeUp)
			recover := time.Since(restarted)
			if _, ok := inv.Get(before); !ok {
				t.Error("image from before the restart lost")
			}
			if got := rec.upHistory(); !slices.Equal(got, []bool{true, false, true}) {
				t.Errorf("RuntimeUp calls = %v, want [true false true]", got)
			}
			t.Logf("%s restart: down detected in %v, recovered %v after restart (backoff base 2s)", f.Name, detect, recover)
		})
	}
}

// TestIntegrationContainers: real running containers (pods through CRI, with
// the kubelet's labels) are attributed to the right digest, also when one
// image ID has two manifest digests.
func TestIntegrationContainers(t *testing.T) {
	pause := harness.PauseBinary(t)
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			reg := harness.StartRegistry(t)
			sandbox := harness.PauseImage(t, reg, pause)
			ctd := harness.StartContainerd(t, harness.WithFlavour(f), harness.WithInsecureRegistry(reg), harness.WithSandboxImage(sandbox))
			n := &node{reg: reg, ctd: ctd, c: harness.DialCRI(t, ctd)}
			dA := harness.PushRunnableImage(t, reg+"/shop/api:v1", pause)
			img := harness.RunnableImage(t, pause)
			dS1 := harness.PushImage(t, reg+"/a/same:v1", img)
			dS2 := harness.PushImage(t, reg+"/b/same:v1", mutate.Annotations(img, map[string]string{"x": "y"}).(v1.Image))
			idS := n.pull(t, reg+"/a/same:v1")
			if id := n.pull(t, reg+"/b/same@"+dS2); id != idS {
				t.Fatalf("shared config gave two IDs %s %s", idS, id)
			}
			pods := harness.NewPods(t, ctd, nil, "node-a")
			ctx := t.Context()
			pods.RunPod(ctx, reg+"/shop/api:v1", "shop", "api-0")
			pods.RunPod(ctx, reg+"/a/same:v1", "x", "a-0")
			pods.RunPod(ctx, reg+"/b/same@"+dS2, "x", "b-0")
			inv := n.readyInventory(t)
			want := map[string]string{dA: "shop/api-0", dS1: "x/a-0", dS2: "x/b-0"}
			for dg, pod := range want {
				cs := inv.ContainersUsing(dg)
				if len(cs) != 1 || cs[0].PodNamespace+"/"+cs[0].PodName != pod || cs[0].Name != "main" {
					t.Errorf("ContainersUsing(%s) = %+v, want %s", dg, cs, pod)
				}
			}
		})
	}
}

// TestIntegrationRecoveryTime measures how long the inventory takes to be
// current again after containerd comes back, with the default backoff
// (200ms base, 30s cap): the THREATS "seconds to recover" figure.
func TestIntegrationRecoveryTime(t *testing.T) {
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			n := newNode(t, f)
			rt := &sessionCounter{Runtime: n.c}
			inv := inventory.New(rt, nil)
			start(t, inv)
			eventually(t, 30*time.Second, "ready", inv.Ready)
			n.ctd.Kill()
			eventually(t, 30*time.Second, "runtime down", func() bool { return !inv.RuntimeUp() })
			// A few failed reconnects: the backoff has grown.
			down := rt.sessions.Load()
			eventually(t, 60*time.Second, "4 failed reconnect attempts", func() bool { return rt.sessions.Load() >= down+4 })
			restarted := time.Now()
			n.ctd.Start()
			started := time.Since(restarted)
			eventually(t, 30*time.Second, "runtime up", inv.RuntimeUp)
			t.Logf("%s: containerd start %v; inventory up %v after restart (default backoff)", f.Name, started, time.Since(restarted))
		})
	}
}

// readyInventory runs an inventory on the node's runtime until the test ends
// and waits for its first full list.
func (n *node) readyInventory(t *testing.T) *inventory.Inventory {
	t.Helper()
	inv := inventory.New(n.c, nil)
	start(t, inv)
	eventually(t, 30*time.Second, "ready", inv.Ready)
	return inv
}

// sessionCounter counts the inventory's connection attempts (each session
// starts by subscribing to events).
type sessionCounter struct {
	inventory.Runtime
	sessions atomic.Int64
}

func (s *sessionCounter) Events(ctx context.Context) (<-chan cri.Event, <-chan error) {
	s.sessions.Add(1)
	return s.Runtime.Events(ctx)
}
