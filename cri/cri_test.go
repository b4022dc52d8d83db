package cri_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	critest "k8s.io/cri-api/pkg/apis/testing"

	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

func TestDialRejectsBadEndpoints(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, endpoint, ns string
	}{
		{"tcp", "tcp://127.0.0.1:1234", "k8s.io"},
		{"empty unix path", "unix://", "k8s.io"},
		{"relative", "run/containerd.sock", "k8s.io"},
		{"empty namespace", "unix:///run/containerd/containerd.sock", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, err := cri.Dial(t.Context(), tt.endpoint, tt.ns)
			if err == nil {
				_ = c.Close()
				t.Fatalf("Dial(%q, %q) = nil error", tt.endpoint, tt.ns)
			}
		})
	}
}

func TestUnavailableRuntime(t *testing.T) {
	t.Parallel()
	c, err := cri.Dial(t.Context(), "unix://"+t.TempDir()+"/none.sock", "k8s.io", cri.WithTimeout(2*time.Second))
	if err != nil {
		t.Fatalf("Dial must not need the runtime: %v", err)
	}
	defer c.Close()
	if _, err := c.ListImages(t.Context()); !errors.Is(err, cri.ErrUnavailable) {
		t.Fatalf("ListImages on a missing socket: %v, want ErrUnavailable", err)
	}
	_, errc := c.Events(t.Context())
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("nil error from a failed event stream")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("event stream on a missing socket did not fail")
	}
}

// TestClient runs the adapter against both containerd lines.
func TestClient(t *testing.T) {
	t.Parallel()
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			t.Parallel()
			fake := critest.NewFakeRuntimeService()
			n := harness.StartNode(t, harness.WithFlavour(f), harness.WithCRI(cri.WithRuntimeService(fake)))
			reg, c := n.Registry.Host, n.CRI
			ctx := t.Context()

			evc, errc := c.Events(ctx)

			ref := reg + "/app/one:v1"
			img := harness.RandomImage(t, 1024)
			digest := harness.PushImage(t, ref, img)
			id, err := c.PullImage(ctx, ref, nil)
			if err != nil {
				t.Fatal(err)
			}
			if want := harness.ImageID(t, img); id != want {
				t.Errorf("PullImage = %s, want image ID %s", id, want)
			}

			// Events: the pull creates the tag, the repo digest and the ID names.
			want := map[string]bool{ref: false, reg + "/app/one@" + digest: false}
			deadline := time.After(30 * time.Second)
			for !want[ref] || !want[reg+"/app/one@"+digest] {
				select {
				case ev := <-evc:
					if _, ok := want[ev.Name]; ok && ev.Topic == cri.TopicImageCreate {
						want[ev.Name] = true
					}
				case err := <-errc:
					t.Fatalf("event stream: %v", err)
				case <-deadline:
					t.Fatalf("missing create events: %v", want)
				}
			}

			list, err := c.ListImages(ctx)
			if err != nil {
				t.Fatal(err)
			}
			i := slices.IndexFunc(list, func(im cri.Image) bool { return im.ID == id })
			if i < 0 {
				t.Fatalf("pulled image %s not in ListImages %+v", id, list)
			}
			if !slices.Contains(list[i].RepoTags, ref) || !slices.Contains(list[i].RepoDigests, reg+"/app/one@"+digest) {
				t.Errorf("ListImages entry %+v lacks %s / %s", list[i], ref, digest)
			}

			for _, name := range []string{ref, id, reg + "/app/one@" + digest} {
				st, err := c.ImageStatus(ctx, name)
				if err != nil || st == nil || st.ID != id {
					t.Errorf("ImageStatus(%s) = %+v, %v; want ID %s", name, st, err, id)
				}
			}
			if st, err := c.ImageStatus(ctx, reg+"/app/none:v1"); st != nil || err != nil {
				t.Errorf("ImageStatus(absent) = %+v, %v; want nil, nil", st, err)
			}

			targets, err := c.ImageTargets(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if targets[ref] != digest {
				t.Errorf("ImageTargets[%s] = %q, want %s", ref, targets[ref], digest)
			}
			if got, err := c.ImageTarget(ctx, ref); err != nil || got != digest {
				t.Errorf("ImageTarget(%s) = %q, %v", ref, got, err)
			}
			if _, err := c.ImageTarget(ctx, reg+"/app/none:v1"); !errors.Is(err, cri.ErrNotFound) {
				t.Errorf("ImageTarget(absent) error = %v, want ErrNotFound", err)
			}

			// Containers come from the injected runtime service.
			fake.SetFakeContainers([]*critest.FakeContainer{{
				ContainerStatus: runtimeapi.ContainerStatus{
					Id:       "c1",
					Metadata: &runtimeapi.ContainerMetadata{Name: "app"},
					Image:    &runtimeapi.ImageSpec{Image: ref},
					ImageRef: id,
					State:    runtimeapi.ContainerState_CONTAINER_RUNNING,
					Labels:   map[string]string{cri.LabelPodNamespace: "shop", cri.LabelPodName: "api-0"},
				},
			}, {
				ContainerStatus: runtimeapi.ContainerStatus{
					Id:       "c2",
					Metadata: &runtimeapi.ContainerMetadata{Name: "old"},
					Image:    &runtimeapi.ImageSpec{Image: ref},
					State:    runtimeapi.ContainerState_CONTAINER_EXITED,
				},
			}})
			cs, err := c.ListContainers(ctx)
			if err != nil {
				t.Fatal(err)
			}
			wantC := []cri.Container{{ID: "c1", Name: "app", Image: ref, ImageRef: id, ImageID: id, PodNamespace: "shop", PodName: "api-0"}}
			if !slices.Equal(cs, wantC) {
				t.Errorf("ListContainers = %+v, want %+v", cs, wantC)
			}

			if err := c.RemoveImage(ctx, id); err != nil {
				t.Fatal(err)
			}
			if st, err := c.ImageStatus(ctx, ref); st != nil || err != nil {
				t.Errorf("after remove ImageStatus = %+v, %v", st, err)
			}
			deadline = time.After(30 * time.Second)
			for {
				select {
				case ev := <-evc:
					if ev.Topic == cri.TopicImageDelete && ev.Name == ref {
						return
					}
				case err := <-errc:
					t.Fatalf("event stream: %v", err)
				case <-deadline:
					t.Fatal("no delete event for the tag")
				}
			}
		})
	}
}

// TestEventsEndOnCancel: cancelling the context ends the stream with ctx.Err().
func TestEventsEndOnCancel(t *testing.T) {
	t.Parallel()
	c := harness.StartNode(t).CRI
	ctx, cancel := context.WithCancel(t.Context())
	_, errc := c.Events(ctx)
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("error after cancel = %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("stream did not end after cancel")
	}
}

// TestPinImage: PinImage sets io.cri-containerd.pinned=pinned through the
// containerd API without touching the other labels, is idempotent, and CRI
// reports the image as pinned (what kubelet's image GC reads).
func TestPinImage(t *testing.T) {
	t.Parallel()
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			t.Parallel()
			n := harness.StartNode(t, harness.WithFlavour(f))
			reg, c := n.Registry.Host, n.CRI
			ctx := t.Context()
			ref := reg + "/app/pin@" + harness.PushRandomImage(t, reg+"/app/pin:v1", 1024)
			if _, err := c.PullImage(ctx, ref, nil); err != nil {
				t.Fatal(err)
			}
			before, err := c.ImageLabels(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			for range 2 {
				if err := c.PinImage(ctx, ref); err != nil {
					t.Fatal(err)
				}
			}
			after, err := c.ImageLabels(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			if after[cri.LabelPinned] != cri.LabelPinnedValue {
				t.Errorf("labels after PinImage = %v, want %s=%s", after, cri.LabelPinned, cri.LabelPinnedValue)
			}
			for k, v := range before {
				if after[k] != v {
					t.Errorf("label %s changed from %q to %q", k, v, after[k])
				}
			}
			// CRI learns of the label from containerd's image update event.
			// containerd 1.6 sets the label but its CRI plugin never reports
			// pinned images (label support came with containerd 1.7).
			if f != harness.Containerd16 {
				harness.Eventually(t, 30*time.Second, "CRI ImageStatus(ref).pinned after the label was set", func() (bool, string) {
					st, err := c.ImageStatus(ctx, ref)
					if err != nil || st == nil {
						t.Fatalf("ImageStatus(%s) = %+v, %v", ref, st, err)
					}
					return st.Pinned, fmt.Sprintf("%+v", st)
				})
			}
			if err := c.PinImage(ctx, reg+"/app/none@sha256:"+strings.Repeat("0", 64)); !errors.Is(err, cri.ErrNotFound) {
				t.Errorf("PinImage(absent) = %v, want ErrNotFound", err)
			}
		})
	}
}
