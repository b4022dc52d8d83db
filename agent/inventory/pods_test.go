package inventory_test

import (
	"context"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// A real container that starts or stops is seen within 5 s, from
// containerd's task events: the container relist is an hour away.
func TestIntegrationRealContainersSeenFast(t *testing.T) {
	pause := harness.PauseBinary(t)
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			reg := harness.StartRegistry(t)
			sandbox := harness.PauseImage(t, reg, pause)
			ctd := harness.StartContainerd(t, harness.WithFlavour(f), harness.WithInsecureRegistry(reg), harness.WithSandboxImage(sandbox))
			c := harness.DialCRI(t, ctd)
			inv := inventory.New(c, nil, inventory.WithContainerResync(time.Hour), inventory.WithResyncInterval(time.Hour))
			start(t, inv)
			eventually(t, 10*time.Second, "ready", inv.Ready)

			ref := reg + "/shop/api:v1"
			digest := harness.PushRunnableImage(t, ref, pause)
			pods := harness.NewPods(t, ctd, nil, "node-a")
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			defer cancel()
			pod := pods.RunPod(ctx, ref, "shop", "api-0")
			started := time.Now()
			eventually(t, 5*time.Second, "running container seen", func() bool {
				cs := inv.ContainersUsing(digest)
				return len(cs) == 1 && cs[0].ID == pod.ContainerID && cs[0].PodName == "api-0" && cs[0].PodNamespace == "shop"
			})
			t.Logf("%s: start seen after %v", f.Name, time.Since(started))
			pods.StopPod(ctx, pod)
			stopped := time.Now()
			eventually(t, 5*time.Second, "stopped container gone", func() bool { return len(inv.ContainersUsing(digest)) == 0 })
			t.Logf("%s: stop seen after %v", f.Name, time.Since(stopped))
		})
	}
}

// The event stream names the container of every task start and exit.
func TestIntegrationTaskEvents(t *testing.T) {
	pause := harness.PauseBinary(t)
	reg := harness.StartRegistry(t)
	sandbox := harness.PauseImage(t, reg, pause)
	ctd := harness.StartContainerd(t, harness.WithFlavour(harness.Containerd16), harness.WithInsecureRegistry(reg), harness.WithSandboxImage(sandbox))
	c := harness.DialCRI(t, ctd)
	evc, errc := c.Events(t.Context())
	ref := reg + "/shop/api:v1"
	harness.PushRunnableImage(t, ref, pause)
	pods := harness.NewPods(t, ctd, nil, "node-a")
	pod := pods.RunPod(t.Context(), ref, "shop", "api-0")
	waitEvent := func(topic string) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case ev := <-evc:
				if ev.Topic == topic && ev.Name == pod.ContainerID {
					if !ev.IsContainer() {
						t.Errorf("%s: IsContainer = false", topic)
					}
					return
				}
			case err := <-errc:
				t.Fatalf("event stream ended: %v", err)
			case <-deadline:
				t.Fatalf("no %s event for %s", topic, pod.ContainerID)
			}
		}
	}
	waitEvent(cri.TopicTaskStart)
	pods.StopPod(t.Context(), pod)
	waitEvent(cri.TopicTaskExit)
}
