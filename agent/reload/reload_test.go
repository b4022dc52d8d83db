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

// watcher runs a Watcher and records, in order, every check it makes after
// a debounce: "changed" or "unchanged".
type watcher struct {
	calls  atomic.Int32
	checks chan bool
}

func startWatcher(t *testing.T, files []string) *watcher {
	t.Helper()
	w := &watcher{checks: make(chan bool, 100)}
	rw, err := New(files, 20*time.Millisecond, slog.New(slog.DiscardHandler), func() { w.calls.Add(1) },
		WithCheckHook(func(changed bool) {
			select {
			case w.checks <- changed:
			default: // a test that stopped reading must not block the watcher
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { _ = rw.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return w
}

// nextCheck waits for the watcher's next check and returns its outcome.
func (w *watcher) nextCheck(t *testing.T) bool {
	t.Helper()
	select {
	case c := <-w.checks:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("the watcher made no check")
		return false
	}
}

// waitCalls waits for the callback count to reach want, check by check.
func waitCalls(t *testing.T, w *watcher, want int32) {
	t.Helper()
	for w.calls.Load() < want {
		w.nextCheck(t)
	}
	if got := w.calls.Load(); got != want {
		t.Fatalf("callbacks = %d, want %d", got, want)
	}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestPlainWriteAndUnrelatedFile: an unrelated file changes nothing. The
// proof is positive: a dot-file written after it makes the watcher check
// (inotify delivers events in order), and that check, which has seen the
// unrelated write, finds nothing changed and calls nobody.
func TestPlainWriteAndUnrelatedFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	f := filepath.Join(dir, "config.yaml")
	write(t, f, "a: 1\n")
	w := startWatcher(t, []string{f})
	write(t, filepath.Join(dir, "other.txt"), "x")
	write(t, filepath.Join(dir, ".marker"), "x")
	if w.nextCheck(t) {
		t.Fatal("a check after an unrelated write found a change")
	}
	if n := w.calls.Load(); n != 0 {
		t.Fatalf("unrelated file triggered %d reloads", n)
	}
	write(t, f, "a: 22\n")
	waitCalls(t, w, 1)
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
	w := startWatcher(t, []string{f})

	v2 := filepath.Join(dir, "..2026_11_26_10_05_00.2")
	os.Mkdir(v2, 0o755)
	os.WriteFile(filepath.Join(v2, "config.yaml"), []byte("a: 2\n"), 0o600)
	tmp := filepath.Join(dir, "..data_tmp")
	os.Symlink(filepath.Base(v2), tmp)
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(v1)
	waitCalls(t, w, 1)
}

func TestRenameOver(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	f := filepath.Join(dir, "pins.txt")
	os.WriteFile(f, []byte("one\n"), 0o600)
	w := startWatcher(t, []string{f})
	tmp := filepath.Join(dir, "pins.txt.swp")
	os.WriteFile(tmp, []byte("two lines\n"), 0o600)
	os.Rename(tmp, f)
	waitCalls(t, w, 1)
}

// TestMissingDirectoryAppears: a file whose directory does not exist yet
// (a Secret not mounted, or mounted later) is watched through its nearest
// existing ancestor and picked up when it appears.
func TestMissingDirectoryAppears(t *testing.T) {
	t.Parallel()
	base := t.TempDir()
	key := filepath.Join(base, "secrets", "keys", "ci.pub")
	w := startWatcher(t, []string{key})
	if err := os.MkdirAll(filepath.Join(base, "secrets", "keys"), 0o755); err != nil {
		t.Fatal(err)
	}
	// The directory alone is no change of the file.
	if w.nextCheck(t) {
		t.Fatal("a new empty directory counted as a change")
	}
	v := &harness.SecretVolume{Dir: filepath.Dir(key)}
	v.Publish(t, map[string][]byte{"ci.pub": []byte("key one")})
	waitCalls(t, w, 1)
	v.Publish(t, map[string][]byte{"ci.pub": []byte("key two")})
	waitCalls(t, w, 2)
}

// TestSecretKeyRotation: a key in a Secret volume rotated by kubelet's
// ..data swap is a change, though the path of the key never changes.
func TestSecretKeyRotation(t *testing.T) {
	t.Parallel()
	v := &harness.SecretVolume{Dir: t.TempDir()}
	v.Publish(t, map[string][]byte{"ci.pub": []byte("key one"), "root.json": []byte("{}")})
	w := startWatcher(t, []string{filepath.Join(v.Dir, "ci.pub"), filepath.Join(v.Dir, "root.json")})
	v.Publish(t, map[string][]byte{"ci.pub": []byte("key two"), "root.json": []byte("{}")})
	waitCalls(t, w, 1)
}
