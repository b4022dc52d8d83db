package harness_test

import (
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/pinwarden/pinwarden/test/harness"
)

// tbRecorder records how RequireBinary ended the test.
type tbRecorder struct {
	testing.TB
	skipped, failed bool
}

func (r *tbRecorder) Helper() {}
func (r *tbRecorder) Skipf(string, ...any) {
	r.skipped = true
	runtime.Goexit()
}
func (r *tbRecorder) Fatalf(string, ...any) {
	r.failed = true
	runtime.Goexit()
}

func TestRequireBinaryNeverSkipsInCI(t *testing.T) {
	tests := []struct {
		ci                  string
		path                string
		wantSkip, wantFatal bool
	}{
		{"", "/nonexistent/containerd", true, false},
		{"true", "/nonexistent/containerd", false, true},
		{"true", "/bin/sh", false, false},
		{"", "/bin/sh", false, false},
		{"", "sh", false, false},
		{"", "pinwarden-no-such-tool", true, false},
		{"true", "pinwarden-no-such-tool", false, true},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("CI=%q %s", tt.ci, tt.path), func(t *testing.T) {
			t.Setenv("CI", tt.ci)
			r := &tbRecorder{TB: t}
			done := make(chan struct{})
			go func() { defer close(done); harness.RequireBinary(r, tt.path) }()
			<-done
			if r.skipped != tt.wantSkip || r.failed != tt.wantFatal {
				t.Errorf("skipped=%v failed=%v, want %v %v", r.skipped, r.failed, tt.wantSkip, tt.wantFatal)
			}
		})
	}
}

// pull pulls ref through the CRI of c.
func pull(t *testing.T, c *harness.Containerd, ref string) string {
	t.Helper()
	conn, err := grpc.NewClient(c.Endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	resp, err := runtimeapi.NewImageServiceClient(conn).PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	return resp.GetImageRef()
}

// TestHarness: both containerd lines pull from both registries, survive a
// restart with their images, and report the pushed image's ID.
func TestHarness(t *testing.T) {
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			t.Parallel()
			ggcr := harness.StartRegistry(t)
			dist := harness.StartDistributionWith(t, harness.DistributionOptions{}).Host
			c := harness.StartContainerd(t, harness.WithFlavour(f), harness.WithInsecureRegistry(ggcr))
			c.AddInsecureRegistry(dist) // added while running
			for _, reg := range []string{ggcr, dist} {
				img := harness.RandomImage(t, 4096)
				ref := reg + "/h/img:v1"
				digest := harness.PushImage(t, ref, img)
				if got := pull(t, c, ref); got != harness.ImageID(t, img) {
					t.Errorf("pull %s = %s, want image ID %s", ref, got, harness.ImageID(t, img))
				}
				if got := pull(t, c, reg+"/h/img@"+digest); got != harness.ImageID(t, img) {
					t.Errorf("pull by digest = %s", got)
				}
			}
			c.Restart()
			// The restarted daemon kept its images (same root and state).
			conn, err := grpc.NewClient(c.Endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			st, err := runtimeapi.NewImageServiceClient(conn).ImageStatus(t.Context(),
				&runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ggcr + "/h/img:v1"}})
			if err != nil || st.GetImage() == nil {
				t.Errorf("image lost across restart: %v %v", st, err)
			}
		})
	}
}
