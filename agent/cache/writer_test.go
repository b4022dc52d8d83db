package cache

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/verdict"
)

// TestWriteErrorCountedNotServed closes the bbolt file under the cache, so
// every later write fails for real inside bbolt.
func TestWriteErrorCountedNotServed(t *testing.T) {
	t.Parallel()
	obs := &countingObserver{}
	c := mustOpen(t, PathIn(t.TempDir()), WithObserver(obs), WithFlushDelay(0))
	c.Put(result(1, "fp"), time.Hour)
	waitFor(t, func() bool { return pendingEmpty(c) })
	if err := c.db.Close(); err != nil {
		t.Fatal(err)
	}
	c.Put(result(2, "fp"), time.Hour)
	waitFor(t, func() bool { return c.Stats().WriteErrors >= 1 })
	if obs.writeErrors.Load() < 1 {
		t.Error("observer not told about the write error")
	}
	for i := 1; i <= 2; i++ {
		if r, ok := c.Get(digest(i), "fp"); !ok || r.Verdict != verdict.Verified {
			t.Errorf("digest %d: %+v %v, want served from memory", i, r, ok)
		}
	}
	_ = c.Close()
}

// TestDiskFull runs the cache on a real 512 KiB tmpfs and fills it. It needs
// root and CAP_SYS_ADMIN to mount; elsewhere it is skipped (and says so).
func TestDiskFull(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=512k,mode=0700"); err != nil {
		t.Skipf("cannot mount tmpfs (needs CAP_SYS_ADMIN): %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("unmount: %v", err)
		}
	})
	obs := &countingObserver{}
	c, err := Open(t.Context(), PathIn(dir), WithObserver(obs), WithFlushDelay(0), WithLogger(testLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() }) // before the unmount
	// Fill the disk: ~2 KiB per entry, 1000 entries is ~2 MiB > 512 KiB.
	const n = 1000
	for i := range n {
		r := result(i, "fp")
		r.Detail = strings.Repeat("d", 2000)
		c.Put(r, time.Hour)
		if i%50 == 0 {
			waitFor(t, func() bool { return pendingEmpty(c) })
		}
	}
	waitFor(t, func() bool { return pendingEmpty(c) })
	full := c.Stats().WriteErrors
	t.Logf("disk full: %d write errors over %d puts", full, n)
	if full == 0 || obs.writeErrors.Load() == 0 {
		t.Fatal("no write error on a full disk")
	}
	for i := range n {
		if _, ok := c.Get(digest(i), "fp"); !ok {
			t.Fatalf("digest %d not served from memory on a full disk", i)
		}
	}
	if err := c.Close(); err != nil {
		t.Logf("Close on a full disk: %v", err)
	}
	// The file left behind by failed transactions is not corrupt: what was
	// written before the disk filled up is still there after a restart.
	c2, err := Open(t.Context(), PathIn(dir), WithLogger(testLogger(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c2.Close() }()
	t.Logf("after restart on the full disk: %d entries, degraded=%v", c2.Len(), c2.Degraded())
	if c2.Stats().Corrupt != 0 || c2.Degraded() || c2.Len() == 0 {
		t.Errorf("restart after disk full: corrupt=%d degraded=%v len=%d", c2.Stats().Corrupt, c2.Degraded(), c2.Len())
	}
	if _, ok := c2.Get(digest(0), "fp"); !ok {
		t.Error("first entry (written before the disk filled) lost")
	}
}
