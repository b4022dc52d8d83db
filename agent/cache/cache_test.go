package cache

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/goleak"

	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/test/harness"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		holdLock(os.Getenv(helperEnv))
		return
	}
	goleak.VerifyTestMain(m)
}

// countingObserver implements Observer, HitObserver and CorruptObserver.
type countingObserver struct {
	writeErrors, hits, misses, corrupt atomic.Int64
}

func (o *countingObserver) CacheWriteError() { o.writeErrors.Add(1) }
func (o *countingObserver) CacheHit()        { o.hits.Add(1) }
func (o *countingObserver) CacheMiss()       { o.misses.Add(1) }
func (o *countingObserver) CacheCorrupt()    { o.corrupt.Add(1) }

func digest(i int) string { return fmt.Sprintf("sha256:%064x", i) }

func result(i int, fp string) verdict.Result {
	return verdict.Result{
		Digest:      digest(i),
		Verdict:     verdict.Verified,
		Policy:      "internal",
		Fingerprint: fp,
		Signers:     []string{"sha256:abcd"},
		VerifiedAt:  time.Date(2026, 1, 2, 3, 0, 0, 0, time.UTC),
		Source:      verdict.SourceRegistry,
		Detail:      "ok",
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func mustOpen(t *testing.T, path string, opts ...Option) *Cache {
	t.Helper()
	opts = append([]Option{WithLogger(testLogger(t))}, opts...)
	c, err := Open(t.Context(), path, opts...)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestSurvivesRestart(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "state")
	path := PathIn(dir)
	c := mustOpen(t, path)
	if c.Degraded() {
		t.Fatal("fresh cache is degraded")
	}
	want := result(1, "fp1")
	c.Put(want, time.Hour)
	c.Put(result(2, "fp1"), time.Hour)
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode = %v, want 0700", st.Mode().Perm())
	}

	c2 := mustOpen(t, path)
	if c2.Len() != 2 {
		t.Fatalf("Len after reopen = %d, want 2", c2.Len())
	}
	got, ok := c2.Get(want.Digest, "fp1")
	if !ok {
		t.Fatal("entry lost across restart")
	}
	want.Source = verdict.SourceCache
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
	if _, ok := c2.Get(want.Digest, "fp-other"); ok {
		t.Error("hit under another fingerprint")
	}
}

func TestGetSetsSourceCache(t *testing.T) {
	t.Parallel()
	c := mustOpen(t, PathIn(t.TempDir()))
	c.Put(result(1, "fp"), time.Hour)
	got, ok := c.Get(digest(1), "fp")
	if !ok || got.Source != verdict.SourceCache {
		t.Fatalf("Get = %+v, %v; want source cache", got, ok)
	}
	// Mutating the caller's slice after Put must not change the cached entry.
	r := result(2, "fp")
	c.Put(r, time.Hour)
	r.Signers[0] = "evil"
	got, _ = c.Get(digest(2), "fp")
	if got.Signers[0] != "sha256:abcd" {
		t.Errorf("cached signers aliased caller's slice: %v", got.Signers)
	}
	// Ignored puts.
	c.Put(verdict.Result{Verdict: verdict.Verified}, time.Hour)
	c.Put(result(3, "fp"), 0)
	if c.Len() != 2 {
		t.Errorf("Len = %d, want 2 (empty digest and zero ttl ignored)", c.Len())
	}
}

func TestTTLExpiry(t *testing.T) {
	t.Parallel()
	clk := harness.NewClock()
	path := PathIn(t.TempDir())
	obs := &countingObserver{}
	c := mustOpen(t, path, WithClock(clk.Now), WithObserver(obs))
	c.Put(result(1, "fp"), time.Hour)
	c.Put(result(2, "fp"), 10*time.Minute)
	waitFor(t, func() bool { return pendingEmpty(c) }) // on disk before they expire

	steps := []struct {
		advance    time.Duration
		hit1, hit2 bool
	}{
		{0, true, true},
		{10*time.Minute - time.Nanosecond, true, true},
		{time.Nanosecond, true, false}, // exactly at expiry: expired
		{50*time.Minute - time.Nanosecond, true, false},
		{time.Nanosecond, false, false},
	}
	for i, s := range steps {
		clk.Advance(s.advance)
		_, h1 := c.Get(digest(1), "fp")
		_, h2 := c.Get(digest(2), "fp")
		if h1 != s.hit1 || h2 != s.hit2 {
			t.Errorf("step %d: hits = %v,%v; want %v,%v", i, h1, h2, s.hit1, s.hit2)
		}
	}
	if obs.hits.Load() != 6 || obs.misses.Load() != 4 {
		t.Errorf("observer hits/misses = %d/%d, want 6/4", obs.hits.Load(), obs.misses.Load())
	}
	if st := c.Stats(); st.Hits != 6 || st.Misses != 4 {
		t.Errorf("Stats = %+v", st)
	}
	if n := c.Prune(); n != 2 || c.Len() != 0 {
		t.Errorf("Prune = %d, Len = %d; want 2, 0", n, c.Len())
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if n := diskEntries(t, path); n != 0 {
		t.Errorf("%d pruned entries still on disk", n)
	}

	// Expired on disk: not loaded after a restart.
	clk2 := harness.NewClock()
	c = mustOpen(t, path, WithClock(clk2.Now))
	c.Put(result(3, "fp"), 2*time.Hour)
	c.Put(result(4, "fp"), 30*time.Minute)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	clk2.Advance(time.Hour)
	c = mustOpen(t, path, WithClock(clk2.Now))
	if c.Len() != 1 {
		t.Fatalf("Len after restart past one expiry = %d, want 1", c.Len())
	}
	if _, ok := c.Get(digest(3), "fp"); !ok {
		t.Error("unexpired entry missing after restart")
	}
}

func TestInvalidateExcept(t *testing.T) {
	t.Parallel()
	path := PathIn(t.TempDir())
	// A long flush delay keeps everything pending, so the ordering of
	// pending puts, deletes and invalidations is exercised.
	c := mustOpen(t, path, WithFlushDelay(time.Hour))
	for i := range 3 {
		c.Put(result(i, "old"), time.Hour)
		c.Put(result(i, "mid"), time.Hour)
		c.Put(result(i, "new"), time.Hour)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c = mustOpen(t, path, WithFlushDelay(time.Hour))
	if c.Len() != 9 {
		t.Fatalf("Len = %d, want 9", c.Len())
	}
	if n := c.InvalidateExcept(map[string]bool{"mid": true, "new": true}); n != 3 {
		t.Errorf("first invalidation dropped %d, want 3", n)
	}
	c.Put(result(9, "old"), time.Hour) // a late put under the old policy...
	if n := c.InvalidateExcept(map[string]bool{"new": true, "old": false}); n != 4 {
		t.Errorf("second invalidation dropped %d, want 4 (3 mid + the late old)", n)
	}
	c.Put(result(10, "new"), time.Hour)
	check := func(c *Cache, when string) {
		t.Helper()
		for i := range 3 {
			for _, fp := range []string{"old", "mid"} {
				if _, ok := c.Get(digest(i), fp); ok {
					t.Errorf("%s: stale verdict for %d under %q served", when, i, fp)
				}
			}
			if _, ok := c.Get(digest(i), "new"); !ok {
				t.Errorf("%s: current verdict for %d lost", when, i)
			}
		}
		if _, ok := c.Get(digest(9), "old"); ok {
			t.Errorf("%s: late put under old policy served", when)
		}
		if _, ok := c.Get(digest(10), "new"); !ok {
			t.Errorf("%s: put after invalidation lost", when)
		}
		if c.Len() != 4 {
			t.Errorf("%s: Len = %d, want 4", when, c.Len())
		}
	}
	check(c, "memory")
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	check(mustOpen(t, path), "after restart")
}

func TestDelete(t *testing.T) {
	t.Parallel()
	path := PathIn(t.TempDir())
	c := mustOpen(t, path, WithFlushDelay(time.Hour))
	c.Put(result(1, "a"), time.Hour)
	c.Put(result(1, "b"), time.Hour)
	c.Put(result(2, "a"), time.Hour)
	c.Delete(digest(1))
	if _, ok := c.Get(digest(1), "a"); ok {
		t.Error("deleted entry served")
	}
	c.Put(result(2, "b"), time.Hour)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c = mustOpen(t, path, WithFlushDelay(time.Hour))
	if c.Len() != 2 {
		t.Fatalf("Len after restart = %d, want 2", c.Len())
	}
	// Delete then Put again: the new put survives the restart.
	c.Delete(digest(2))
	c.Put(result(2, "a"), time.Hour)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c = mustOpen(t, path)
	if _, ok := c.Get(digest(2), "a"); !ok || c.Len() != 1 {
		t.Errorf("after delete+put+restart: hit=%v Len=%d, want true, 1", ok, c.Len())
	}
}

func TestConcurrentUse(t *testing.T) {
	t.Parallel()
	c := mustOpen(t, PathIn(t.TempDir()), WithFlushDelay(time.Millisecond))
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 500 {
				d := (w*31 + i) % 64
				switch i % 10 {
				case 0:
					c.Delete(digest(d))
				case 1:
					c.InvalidateExcept(map[string]bool{"fp": true})
				case 2, 3, 4:
					c.Put(result(d, "fp"), time.Hour)
				default:
					if r, ok := c.Get(digest(d), "fp"); ok && r.Digest != digest(d) {
						t.Errorf("Get(%d) returned %s", d, r.Digest)
					}
				}
				_ = c.Len()
			}
		})
	}
	wg.Wait()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

// pendingEmpty reports whether every operation so far has been flushed.
func pendingEmpty(c *Cache) bool {
	c.mu.RLock()
	empty := c.pending.empty()
	c.mu.RUnlock()
	if !empty {
		return false
	}
	c.flushMu.Lock() // wait for a flush in progress
	c.flushMu.Unlock()
	return true
}

type boltTx = bolt.Tx

func diskEntries(t *testing.T, path string) int {
	t.Helper()
	db := openRaw(t, path)
	defer func() { _ = db.Close() }()
	n := 0
	if err := db.View(func(tx *bolt.Tx) error {
		n = tx.Bucket(bucketName).Stats().KeyN
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return n
}

func openRaw(t *testing.T, path string) *bolt.DB {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return db
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	harness.Eventually(t, 10*time.Second, "condition", func() (bool, string) { return cond(), "" })
}
