package image

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"

	"github.com/pinwarden/pinwarden/test/harness"
)

// TestImageRunsInContainerd imports the OCI layout into a real containerd,
// unpacks it and runs `pinwarden version` from it as a container (runc),
// as the image's non-root user.
func TestImageRunsInContainerd(t *testing.T) {
	harness.SkipShort(t, "runs containerd")
	const version, commit = "v9.8.7-ctr", "def5678"
	_, dir, want := buildLayout(t, version, commit)

	c := harness.StartContainerd(t)
	client, err := containerd.New(c.Address())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(t.Context(), "pinwarden-test"), 2*time.Minute)
	defer cancel()

	imported, err := client.Import(ctx, tarDir(t, dir), containerd.WithAllPlatforms(false))
	if err != nil {
		t.Fatalf("import: %v", err)
	}
	var name string
	for _, im := range imported {
		if im.Target.Digest.String() == want.String() {
			name = im.Name
		}
	}
	if name == "" {
		t.Fatalf("imported %+v, none with digest %s", imported, want)
	}
	ci, err := client.GetImage(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := ci.Unpack(ctx, "native"); err != nil {
		t.Fatalf("unpack: %v", err)
	}
	ctr, err := client.NewContainer(ctx, "pinwarden-version",
		containerd.WithSnapshotter("native"),
		containerd.WithNewSnapshot("pinwarden-version", ci),
		containerd.WithNewSpec(oci.WithImageConfig(ci), oci.WithProcessArgs("/pinwarden", "version")))
	if err != nil {
		t.Fatalf("container: %v", err)
	}
	defer func() { _ = ctr.Delete(context.WithoutCancel(ctx), containerd.WithSnapshotCleanup) }()
	// The shim writes the container's output to a file itself: no FIFO
	// copy in this process that could still be running when the exit
	// arrives.
	logPath := filepath.Join(t.TempDir(), "version.log")
	task, err := ctr.NewTask(ctx, cio.LogFile(logPath))
	if err != nil {
		t.Fatalf("task: %v\ncontainerd log:\n%s", err, c.LogTail(30))
	}
	defer func() { _, _ = task.Delete(context.WithoutCancel(ctx), containerd.WithProcessKill) }()
	exit, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	var st containerd.ExitStatus
	select {
	case st = <-exit:
	case <-ctx.Done():
		_ = task.Kill(context.WithoutCancel(ctx), syscall.SIGKILL)
		t.Fatal("pinwarden version did not exit")
	}
	if st.ExitCode() != 0 {
		t.Fatalf("pinwarden version in a container: exit %d", st.ExitCode())
	}
	harness.Eventually(t, 30*time.Second, "the version line in the container's output", func() (bool, string) {
		b, err := os.ReadFile(logPath)
		out := string(b)
		return err == nil && strings.Contains(out, version) && strings.Contains(out, commit), fmt.Sprintf("output %q, %v", out, err)
	})
	spec, err := ctr.Spec(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if spec.Process.User.UID != 65532 {
		t.Errorf("ran as uid %d, want the image's 65532", spec.Process.User.UID)
	}
}

// tarDir streams dir (an OCI layout) as a tar archive.
func tarDir(t *testing.T, dir string) io.Reader {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == dir {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		h, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		h.Name = filepath.ToSlash(rel)
		if d.IsDir() {
			h.Name += "/"
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		_, err = tw.Write(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return &buf
}
