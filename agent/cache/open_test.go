package cache

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/verdict"
)

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
	var rndMu sync.Mutex // the subtests run in parallel; rand.Rand is not safe for that
	random := func(n int) []byte {
		rndMu.Lock()
		defer rndMu.Unlock()
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
