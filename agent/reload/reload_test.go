package reload

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/test/harness"
)

func startWatcher(t *testing.T, files []string) *atomic.Int32 {
	t.Helper()
	var calls atomic.Int32
	w, err := New(files, 20*time.Millisecond, slog.New(slog.DiscardHandler), func() { calls.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { _ = w.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return &calls
}

func waitCalls(t *testing.T, calls *atomic.Int32, want int32) {
	t.Helper()
	harness.Eventually(t, 30*time.Second, "callbacks", func() (bool, string) { return calls.Load() >= want, "" })
	if got := calls.Load(); got != want {
		t.Fatalf("callbacks = %d, want %d", got, want)
	}
}

func TestPlainWriteAndUnrelatedFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	f := filepath.Join(dir, "config.yaml")
	os.WriteFile(f, []byte("a: 1\n"), 0o600)
	calls := startWatcher(t, []string{f})
	os.WriteFile(filepath.Join(dir, "other.txt"), []byte("x"), 0o600)
	time.Sleep(100 * time.Millisecond)
	if calls.Load() != 0 {
		t.Fatalf("unrelated file triggered a reload")
	}
	os.WriteFile(f, []byte("a: 22\n"), 0o600)
	waitCalls(t, calls, 1)
}

// TestConfigMapSymlinkSwap reproduces how kubelet updates a ConfigMap volume:
// config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>, swapped atomically.
func TestConfigMapSymlinkSwap(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	v1 := filepath.Join(dir, "..2026_11_26_10_00_00.1")
	os.Mkdir(v1, 0o755)
	os.WriteFile(filepath.Join(v1, "config.yaml"), []byte("a: 1\n"), 0o600)
	os.Symlink(filepath.Base(v1), filepath.Join(dir, "..data"))
	f := filepath.Join(dir, "config.yaml")
	os.Symlink(filepath.Join("..data", "config.yaml"), f)
	calls := startWatcher(t, []string{f})

	v2 := filepath.Join(dir, "..2026_11_26_10_05_00.2")
	os.Mkdir(v2, 0o755)
	os.WriteFile(filepath.Join(v2, "config.yaml"), []byte("a: 2\n"), 0o600)
	tmp := filepath.Join(dir, "..data_tmp")
	os.Symlink(filepath.Base(v2), tmp)
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(v1)
	waitCalls(t, calls, 1)
}

func TestRenameOver(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	f := filepath.Join(dir, "pins.txt")
	os.WriteFile(f, []byte("one\n"), 0o600)
	calls := startWatcher(t, []string{f})
	tmp := filepath.Join(dir, "pins.txt.swp")
	os.WriteFile(tmp, []byte("two lines\n"), 0o600)
	os.Rename(tmp, f)
	waitCalls(t, calls, 1)
}
