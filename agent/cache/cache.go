// Package cache keeps definitive verdicts across restarts: an in-memory map in
// front of a bbolt file (stateDir/cache.db), keyed on image digest plus policy
// fingerprint, never on a tag.
//
// The cache never takes the agent down and never invents a verdict:
//   - a corrupt file (garbage, truncated, a panic or memory fault inside bbolt)
//     is moved aside to cache.db.corrupt-<unix time> and a fresh file created;
//   - a lock held by another process (a rolling update) is waited for up to a
//     timeout, then the cache runs in memory only and reports Degraded;
//   - failed writes (disk full, read-only file system) are logged and counted
//     through the Observer; the verdict stays served from memory;
//   - a record that does not decode, is filed under another key or carries a
//     verdict that is not one of the five is dropped on load, never served.
package cache

import (
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/pinwarden/pinwarden/agent/verdict"
)

// FileName is the name of the cache file inside the state directory.
const FileName = "cache.db"

// DefaultLockTimeout is how long Open waits for another process's lock.
const DefaultLockTimeout = 2 * time.Second

// defaultFlushDelay lets a burst of Puts share one bbolt transaction.
const defaultFlushDelay = 20 * time.Millisecond

// bucketName holds the verdicts; the suffix is the value schema version.
var bucketName = []byte("verdicts.v1")

// PathIn returns the cache file path inside stateDir.
func PathIn(stateDir string) string { return filepath.Join(stateDir, FileName) }

// Observer is told about failed disk writes (metrics). It may additionally
// implement HitObserver and CorruptObserver; Open detects them.
type Observer interface {
	CacheWriteError()
}

// HitObserver, when implemented by the Observer, counts Get hits and misses.
type HitObserver interface {
	CacheHit()
	CacheMiss()
}

// CorruptObserver, when implemented by the Observer, counts cache files found
// corrupt and moved aside.
type CorruptObserver interface {
	CacheCorrupt()
}

// Stats are the cache's own counters since Open.
type Stats struct {
	Hits, Misses, WriteErrors, Corrupt uint64
}

// Option configures Open.
type Option func(*Cache)

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(c *Cache) { c.log = l } }

// WithClock sets the clock used for expiry (default time.Now).
func WithClock(now func() time.Time) Option { return func(c *Cache) { c.now = now } }

// WithLockTimeout sets how long Open waits for the file lock before falling
// back to memory only (default DefaultLockTimeout).
func WithLockTimeout(d time.Duration) Option { return func(c *Cache) { c.lockTimeout = d } }

// WithObserver reports write errors (and, if implemented, hits, misses and
// corrupt files) to o.
func WithObserver(o Observer) Option { return func(c *Cache) { c.obs = o } }

// WithFlushDelay sets how long the writer waits to batch Puts into one
// transaction (default 20ms). Close always flushes.
func WithFlushDelay(d time.Duration) Option { return func(c *Cache) { c.flushDelay = d } }

type key struct{ digest, fingerprint string }

type entry struct {
	res     verdict.Result
	expires time.Time
}

// record is the on-disk value.
type record struct {
	Result  verdict.Result `json:"result"`
	Expires time.Time      `json:"expires"`
}

// Cache is safe for concurrent use.
type Cache struct {
	// set at Open, read-only afterwards
	path        string
	log         *slog.Logger
	now         func() time.Time
	lockTimeout time.Duration
	flushDelay  time.Duration
	obs         Observer
	hitObs      HitObserver
	corruptObs  CorruptObserver

	mu sync.RWMutex
	// mem is the authoritative view served by Get; guarded by mu.
	mem map[key]entry
	// pending is what the writer still has to write; guarded by mu.
	pending pendingOps
	// putsSincePrune counts Puts since expired entries were last dropped; guarded by mu.
	putsSincePrune int

	degraded atomic.Bool
	hits     atomic.Uint64
	misses   atomic.Uint64
	writeErr atomic.Uint64
	corrupt  atomic.Uint64
	// writeFailing remembers whether the last flush failed, to log transitions only.
	writeFailing atomic.Bool

	// db is nil in memory-only mode and after Close; set by Open before the
	// writer starts, cleared by Close under mu after the writer has stopped.
	db   *bolt.DB
	wake chan struct{}
	stop chan struct{}
	done chan struct{}
	// flushMu is held by the writer during a flush (lets tests wait for one).
	flushMu   sync.Mutex
	closeOnce sync.Once
	closeErr  error
}

// validVerdict reports whether v is one of the five verdicts.
func validVerdict(v verdict.Verdict) bool { return slices.Contains(verdict.All, v) }

func diskKey(digest, fingerprint string) string { return digest + "\x00" + fingerprint }

// Degraded reports whether the cache runs in memory only (lock held by
// another process, or the file could not be opened or rebuilt).
func (c *Cache) Degraded() bool { return c.degraded.Load() }

// Stats returns the counters since Open.
func (c *Cache) Stats() Stats {
	return Stats{Hits: c.hits.Load(), Misses: c.misses.Load(), WriteErrors: c.writeErr.Load(), Corrupt: c.corrupt.Load()}
}

// Get returns the verdict for digest under the policy fingerprint, with
// Source set to cache. Expired entries are misses. The returned Signers slice
// is shared with the cache and must not be modified in place.
func (c *Cache) Get(digest, fingerprint string) (verdict.Result, bool) {
	c.mu.RLock()
	e, ok := c.mem[key{digest, fingerprint}]
	c.mu.RUnlock()
	if !ok || !c.now().Before(e.expires) {
		c.misses.Add(1)
		if c.hitObs != nil {
			c.hitObs.CacheMiss()
		}
		return verdict.Result{}, false
	}
	c.hits.Add(1)
	if c.hitObs != nil {
		c.hitObs.CacheHit()
	}
	return e.res, true
}

// Put stores r (keyed on r.Digest and r.Fingerprint) for ttl. Memory is
// updated at once; the disk write happens in the background and its failure
// is only counted and logged. Results without a digest or with a
// non-positive ttl or a verdict that is not one of the five are ignored.
func (c *Cache) Put(r verdict.Result, ttl time.Duration) {
	if r.Digest == "" || ttl <= 0 || !validVerdict(r.Verdict) {
		return
	}
	r.Source = verdict.SourceCache
	r.Signers = slices.Clip(slices.Clone(r.Signers))
	k := key{r.Digest, r.Fingerprint}
	now := c.now()
	e := entry{res: r, expires: now.Add(ttl)}
	c.mu.Lock()
	c.mem[k] = e
	if c.db != nil {
		c.pending.puts[k] = e
	}
	c.putsSincePrune++
	if c.putsSincePrune >= 1024 {
		c.pruneLocked(now)
	}
	c.mu.Unlock()
	c.kick()
}

// Delete drops every entry for digest, under any fingerprint.
func (c *Cache) Delete(digest string) {
	c.mu.Lock()
	for k := range c.mem {
		if k.digest == digest {
			delete(c.mem, k)
		}
	}
	if c.db != nil {
		for k := range c.pending.puts {
			if k.digest == digest {
				delete(c.pending.puts, k)
			}
		}
		if c.pending.deletes == nil {
			c.pending.deletes = map[string]bool{}
		}
		c.pending.deletes[digest] = true
	}
	c.mu.Unlock()
	c.kick()
}

// InvalidateExcept drops every entry whose policy fingerprint is not in keep.
// Call it on every policy or trust change: no verdict computed under an old
// policy is served afterwards. It returns the number of entries dropped.
func (c *Cache) InvalidateExcept(keep map[string]bool) int {
	c.mu.Lock()
	n := 0
	for k := range c.mem {
		if !keep[k.fingerprint] {
			delete(c.mem, k)
			n++
		}
	}
	if c.db != nil {
		for k := range c.pending.puts {
			if !keep[k.fingerprint] {
				delete(c.pending.puts, k)
			}
		}
		// Two invalidations before a flush: disk must keep only what both keep.
		next := map[string]bool{}
		for fp, ok := range keep {
			if ok && (c.pending.keep == nil || c.pending.keep[fp]) {
				next[fp] = true
			}
		}
		c.pending.keep = next
	}
	c.mu.Unlock()
	c.kick()
	return n
}

// Len returns the number of entries in memory, expired ones included until
// they are pruned.
func (c *Cache) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.mem)
}

// Prune drops expired entries from memory and, on the next flush, from disk,
// and returns how many it dropped. Put calls it every 1024 puts; Open drops
// the expired entries it finds.
func (c *Cache) Prune() int {
	c.mu.Lock()
	n := c.pruneLocked(c.now())
	c.mu.Unlock()
	c.kick()
	return n
}

func (c *Cache) pruneLocked(now time.Time) int {
	c.putsSincePrune = 0
	n := 0
	for k, e := range c.mem {
		if !now.Before(e.expires) {
			delete(c.mem, k)
			n++
			if c.db != nil {
				delete(c.pending.puts, k)
				if c.pending.expired == nil {
					c.pending.expired = map[key]bool{}
				}
				c.pending.expired[k] = true
			}
		}
	}
	return n
}
