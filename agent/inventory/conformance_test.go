package inventory_test

import (
	"fmt"
	"sync/atomic"
	"testing"

	imagesvc "github.com/containerd/containerd/api/services/images/v1"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/inventory/inventorytest"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// The real adapter satisfies the interface the inventory defines.
var _ inventory.Runtime = (*cri.Client)(nil)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestRuntimeConformance runs the same checks against the fake and against
// cri.Client on both containerd lines, so the fake cannot drift.
func TestRuntimeConformance(t *testing.T) {
	t.Run("fake", func(t *testing.T) {
		inventorytest.RuntimeConformance(t, func(t *testing.T) inventorytest.Backend {
			b, _ := inventorytest.FakeBackend(t)
			return b
		})
	})
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			node := harness.StartNode(t, harness.WithFlavour(f))
			reg, ctd, c := node.Registry.Host, node.Containerd, node.CRI
			conn, err := grpc.NewClient(ctd.Endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = conn.Close() })
			images := imagesvc.NewImagesClient(conn)
			var n atomic.Int64
			inventorytest.RuntimeConformance(t, func(t *testing.T) inventorytest.Backend {
				b := realBackend(c, fmt.Sprintf("%s/conf%d", reg, n.Add(1)))
				b.Untag = func(t testing.TB, name string) {
					t.Helper()
					ctx := metadata.AppendToOutgoingContext(t.Context(), "containerd-namespace", "k8s.io")
					if _, err := images.Delete(ctx, &imagesvc.DeleteImageRequest{Name: name}); err != nil {
						t.Fatalf("delete image record %s: %v", name, err)
					}
				}
				return b
			})
		})
	}
}

// realBackend publishes through a registry and pulls through CRI.
func realBackend(c *cri.Client, repo string) inventorytest.Backend {
	return inventorytest.Backend{
		Runtime: c,
		Repo:    repo,
		Publish: func(t testing.TB, ref string) (string, string) {
			t.Helper()
			d := harness.PushRandomImage(t, ref, 512)
			id, err := c.PullImage(t.Context(), ref, nil)
			if err != nil {
				t.Fatal(err)
			}
			return d, id
		},
		Remove: func(t testing.TB, ref string) {
			t.Helper()
			if err := c.RemoveImage(t.Context(), ref); err != nil {
				t.Fatal(err)
			}
		},
	}
}
