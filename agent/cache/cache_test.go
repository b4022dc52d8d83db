package cache

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/goleak"

	"github.com/pinwarden/pinwarden/agent/verdict"
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

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock { return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }
func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

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
	clk := newClock()
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
	clk2 := newClock()
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

// validFile writes a cache file with n entries and returns its bytes.
func validFile(t *testing.T, path string, n int) []byte {
	t.Helper()
	c := mustOpen(t, path)
	for i := range n {
		r := result(i, "fp")
		r.Detail = strings.Repeat("x", 200)
		c.Put(r, time.Hour)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCorruptFileMovedAside(t *testing.T) {
	t.Parallel()
	rnd := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rnd.Uint32())
		}
		return b
	}
	tests := []struct {
		name   string
		mangle func(valid []byte) []byte
	}{
		{"random bytes 64KiB", func([]byte) []byte { return random(64 << 10) }},
		{"random bytes 100", func([]byte) []byte { return random(100) }},
		{"text", func([]byte) []byte { return []byte("this is not a bbolt file\n") }},
		{"truncated to 100 bytes", func(v []byte) []byte { return v[:100] }},
		{"truncated to one page", func(v []byte) []byte { return v[:4096] }},
		{"truncated to half", func(v []byte) []byte { return v[:len(v)/2] }},
		{"truncated to 3 pages", func(v []byte) []byte { return v[:3*4096] }},
		{"bad magic in both meta pages", func(v []byte) []byte {
			v = bytes.Clone(v)
			copy(v[16:20], []byte{1, 2, 3, 4})
			copy(v[4096+16:4096+20], []byte{1, 2, 3, 4})
			return v
		}},
		{"data pages overwritten with garbage", func(v []byte) []byte {
			v = bytes.Clone(v)
			copy(v[2*4096:], random(len(v)-2*4096))
			return v
		}},
		{"leaf pages garbage, freelist intact", func(v []byte) []byte {
			v = bytes.Clone(v)
			keep := freelistPages(v)
			for pg := 2; pg*4096 < len(v); pg++ {
				if !keep[pg] {
					copy(v[pg*4096:(pg+1)*4096], random(4096))
				}
			}
			return v
		}},
		{"data pages overwritten with 0xff", func(v []byte) []byte {
			v = bytes.Clone(v)
			for i := 2 * 4096; i < len(v); i++ {
				v[i] = 0xff
			}
			return v
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := PathIn(dir)
			valid := validFile(t, path, 200)
			if err := os.WriteFile(path, tt.mangle(valid), 0o600); err != nil {
				t.Fatal(err)
			}
			obs := &countingObserver{}
			start := time.Now()
			c := mustOpen(t, path, WithObserver(obs))
			t.Logf("open with corrupt file took %v", time.Since(start))
			if c.Degraded() {
				t.Fatal("degraded after rebuilding a corrupt file")
			}
			if c.Stats().Corrupt != 1 || obs.corrupt.Load() != 1 {
				t.Errorf("corrupt count = %d (observer %d), want 1", c.Stats().Corrupt, obs.corrupt.Load())
			}
			aside, _ := filepath.Glob(path + ".corrupt-*")
			if len(aside) != 1 {
				t.Fatalf("files moved aside = %v, want 1", aside)
			}
			if c.Len() != 0 {
				t.Errorf("Len = %d after rebuild, want 0", c.Len())
			}
			// The rebuilt cache works across a restart.
			c.Put(result(7, "fp"), time.Hour)
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			c = mustOpen(t, path)
			if _, ok := c.Get(digest(7), "fp"); !ok || c.Stats().Corrupt != 0 {
				t.Errorf("rebuilt file: hit=%v corrupt=%d", ok, c.Stats().Corrupt)
			}
		})
	}
}

// freelistPages returns the freelist page ids named by the two meta pages
// (bbolt layout: 16-byte page header, then magic, version, pageSize, flags,
// root bucket (16 bytes), freelist pgid).
func freelistPages(v []byte) map[int]bool {
	m := map[int]bool{}
	for _, off := range []int{0, 4096} {
		pg := int(binary.LittleEndian.Uint64(v[off+48:]))
		if pg > 1 && pg*4096 < len(v) {
			m[pg] = true
		}
	}
	return m
}

// TestGuardRecoversMemoryFault reads a mapped page past the end of a
// truncated file (SIGBUS, what a truncated bbolt mmap does) inside guard.
func TestGuardRecoversMemoryFault(t *testing.T) {
	t.Parallel()
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if err := f.Truncate(2 * 4096); err != nil {
		t.Fatal(err)
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, 2*4096, syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = syscall.Munmap(mem) }()
	if err := f.Truncate(0); err != nil {
		t.Fatal(err)
	}
	var sink byte
	err = guard(func() error { sink = mem[4096]; return nil })
	if !isCorrupt(err) {
		t.Fatalf("guard = %v (read %d), want a corrupt-file error", err, sink)
	}
	t.Logf("recovered: %v", err)
	if err := guard(func() error { panic("boom") }); !isCorrupt(err) {
		t.Errorf("guard(panic) = %v", err)
	}
}

func TestUndecodableEntryDropped(t *testing.T) {
	t.Parallel()
	path := PathIn(t.TempDir())
	c := mustOpen(t, path)
	c.Put(result(1, "fp"), time.Hour)
	c.Put(result(2, "fp"), time.Hour)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	// Overwrite one value with garbage, directly through bbolt.
	db := openRaw(t, path)
	if err := db.Update(func(tx *boltTx) error {
		return tx.Bucket(bucketName).Put([]byte(diskKey(digest(1), "fp")), []byte("{not json"))
	}); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	c = mustOpen(t, path)
	if c.Len() != 1 || c.Stats().Corrupt != 0 {
		t.Fatalf("Len = %d, corrupt = %d; want 1, 0", c.Len(), c.Stats().Corrupt)
	}
	if _, ok := c.Get(digest(1), "fp"); ok {
		t.Error("undecodable entry served")
	}
}

func TestLockHeldDegradesToMemory(t *testing.T) {
	t.Parallel()
	path := PathIn(t.TempDir())
	first := mustOpen(t, path)
	first.Put(result(1, "fp"), time.Hour)

	const timeout = 300 * time.Millisecond
	start := time.Now()
	second := mustOpen(t, path, WithLockTimeout(timeout))
	blocked := time.Since(start)
	t.Logf("second Open blocked %.3fs (lock timeout %v)", blocked.Seconds(), timeout)
	if !second.Degraded() {
		t.Fatal("second Open is not degraded")
	}
	if blocked < timeout || blocked > timeout+time.Second {
		t.Errorf("blocked %v, want about %v", blocked, timeout)
	}
	second.Put(result(2, "fp"), time.Hour)
	if _, ok := second.Get(digest(2), "fp"); !ok {
		t.Error("degraded cache does not serve from memory")
	}
	if err := second.Close(); err != nil {
		t.Errorf("Close degraded: %v", err)
	}
	if _, ok := first.Get(digest(1), "fp"); !ok {
		t.Error("first cache lost its entry")
	}
	if first.Degraded() {
		t.Error("first cache degraded")
	}
}

func TestOpenHonoursContextWhileLocked(t *testing.T) {
	t.Parallel()
	path := PathIn(t.TempDir())
	_ = mustOpen(t, path)
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	c, err := Open(ctx, path, WithLockTimeout(time.Minute))
	if err == nil {
		_ = c.Close()
		t.Fatal("Open succeeded with a cancelled context")
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Open returned after %v, want soon after the context ended", took)
	}
	if _, err := Open(t.Context(), ""); err == nil {
		t.Error("Open with empty path succeeded")
	}
}

const helperEnv = "PINWARDEN_CACHE_HOLD_LOCK"

// holdLock runs in a child process: open the cache, say "ready", and keep the
// lock until stdin closes.
func holdLock(path string) {
	c, err := Open(context.Background(), path, WithLockTimeout(5*time.Second))
	if err != nil || c.Degraded() {
		fmt.Println("failed", err)
		os.Exit(1)
	}
	fmt.Println("ready")
	_, _ = os.Stdin.Read(make([]byte, 1))
	_ = c.Close()
	os.Exit(0)
}

func TestLockHeldByAnotherProcess(t *testing.T) {
	t.Parallel()
	path := PathIn(t.TempDir())
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+path)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	_ = pw.Close()
	buf := make([]byte, 64)
	n, _ := pr.Read(buf)
	out.Write(buf[:n])
	_ = pr.Close()
	if !strings.HasPrefix(out.String(), "ready") {
		t.Fatalf("helper: %q", out.String())
	}

	start := time.Now()
	c := mustOpen(t, path, WithLockTimeout(DefaultLockTimeout))
	blocked := time.Since(start)
	t.Logf("Open while another process holds the lock blocked %.3fs (default timeout %v)", blocked.Seconds(), DefaultLockTimeout)
	if !c.Degraded() {
		t.Fatal("not degraded while another process holds the lock")
	}
	if blocked < DefaultLockTimeout || blocked > DefaultLockTimeout+time.Second {
		t.Errorf("blocked %v, want about %v", blocked, DefaultLockTimeout)
	}
	c.Put(result(1, "fp"), time.Hour)
	if _, ok := c.Get(digest(1), "fp"); !ok {
		t.Error("degraded cache does not serve")
	}
	_ = stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Errorf("helper: %v", err)
	}
	// Once the other process is gone, the next Open gets the file.
	c2 := mustOpen(t, path, WithLockTimeout(time.Second))
	if c2.Degraded() {
		t.Error("degraded after the lock was released")
	}
}

func TestUnusableDirectoryDegrades(t *testing.T) {
	t.Parallel()
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c := mustOpen(t, PathIn(filepath.Join(file, "state")))
	if !c.Degraded() {
		t.Fatal("not degraded with a state dir under a regular file")
	}
	c.Put(result(1, "fp"), time.Hour)
	if _, ok := c.Get(digest(1), "fp"); !ok {
		t.Error("degraded cache does not serve")
	}
}

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
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// Issue 10: a record whose verdict is not one of the five verdicts (a
// tampered or foreign file) is treated as corrupt: dropped, never served.
func TestInvalidVerdictRecordDropped(t *testing.T) {
	t.Parallel()
	path := PathIn(t.TempDir())
	c := mustOpen(t, path)
	c.Put(result(1, "fp"), time.Hour)
	c.Put(result(2, "fp"), time.Hour)
	c.Put(result(3, "fp"), time.Hour)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	db := openRaw(t, path)
	for i, v := range map[int]string{1: "VERIFIED", 2: ""} {
		if err := db.Update(func(tx *boltTx) error {
			b := tx.Bucket(bucketName)
			k := []byte(diskKey(digest(i), "fp"))
			var rec map[string]any
			if err := json.Unmarshal(b.Get(k), &rec); err != nil {
				return err
			}
			rec["result"].(map[string]any)["verdict"] = v
			raw, err := json.Marshal(rec)
			if err != nil {
				return err
			}
			return b.Put(k, raw)
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	c = mustOpen(t, path)
	for _, i := range []int{1, 2} {
		if r, ok := c.Get(digest(i), "fp"); ok {
			t.Errorf("record with verdict %q served", r.Verdict)
		}
	}
	if r, ok := c.Get(digest(3), "fp"); !ok || r.Verdict != verdict.Verified {
		t.Errorf("valid record: %+v, %v", r, ok)
	}
	if c.Len() != 1 {
		t.Errorf("Len = %d, want 1", c.Len())
	}
}
