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
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
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

// pendingOps are disk operations not yet written. The writer applies them in
// this order: invalidation, digest deletes, expired entries, then puts. Any op that would be
// undone by a later invalidation or delete is removed from puts when that
// later op is recorded, so the order reproduces the memory state.
type pendingOps struct {
	keep    map[string]bool // nil: no invalidation pending; else keep only these fingerprints
	deletes map[string]bool // digests
	expired map[key]bool    // single entries pruned for expiry
	puts    map[key]entry
}

func (p *pendingOps) empty() bool {
	return p.keep == nil && len(p.deletes) == 0 && len(p.expired) == 0 && len(p.puts) == 0
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

// Open opens (or creates) the cache file at path, creating its directory with
// mode 0700, and loads the entries that have not expired.
//
// Open fails only when ctx is done or path is empty. Every problem with the
// file itself ends in a working cache: a corrupt file is moved aside and
// rebuilt; a lock held elsewhere or an unusable directory gives a memory-only
// cache that reports Degraded.
func Open(ctx context.Context, path string, opts ...Option) (*Cache, error) {
	if path == "" {
		return nil, errors.New("cache: empty path")
	}
	c := &Cache{
		path:        path,
		log:         slog.New(slog.DiscardHandler),
		now:         time.Now,
		lockTimeout: DefaultLockTimeout,
		flushDelay:  defaultFlushDelay,
		mem:         map[key]entry{},
		wake:        make(chan struct{}, 1),
		stop:        make(chan struct{}),
		done:        make(chan struct{}),
	}
	for _, o := range opts {
		o(c)
	}
	c.hitObs, _ = c.obs.(HitObserver)
	c.corruptObs, _ = c.obs.(CorruptObserver)
	c.pending.puts = map[key]entry{}
	c.log = c.log.With("path", path)

	db, err := c.openDisk(ctx)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, fmt.Errorf("open cache %s: %w", path, ctxErr)
		}
		c.degraded.Store(true)
		c.log.Warn("verdict cache runs in memory only", "err", err)
		close(c.done)
		return c, nil
	}
	c.db = db
	go c.writer()
	return c, nil
}

// openDisk opens the file, moving it aside and retrying once when it is corrupt.
func (c *Cache) openDisk(ctx context.Context) (*bolt.DB, error) {
	if err := os.MkdirAll(filepath.Dir(c.path), 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	for attempt := 0; ; attempt++ {
		db, err := c.openLocked(ctx)
		if err != nil {
			if errors.Is(err, bolt.ErrTimeout) {
				return nil, fmt.Errorf("cache file locked by another process after %s: %w", c.lockTimeout, err)
			}
			if ctx.Err() != nil || !isCorrupt(err) || attempt > 0 {
				return nil, err
			}
		} else {
			err = c.load(db)
			if err == nil {
				return db, nil
			}
			_ = db.Close() // the file is being discarded; its close error adds nothing
			if !isCorrupt(err) || attempt > 0 {
				return nil, err
			}
		}
		if mvErr := c.moveAside(err); mvErr != nil {
			return nil, mvErr
		}
	}
}

// corruptError marks an error that means the file's content is unusable.
type corruptError struct{ err error }

func (e *corruptError) Error() string { return "corrupt cache file: " + e.err.Error() }
func (e *corruptError) Unwrap() error { return e.err }

func isCorrupt(err error) bool {
	var ce *corruptError
	if errors.As(err, &ce) ||
		errors.Is(err, bolt.ErrInvalid) || errors.Is(err, bolt.ErrVersionMismatch) ||
		errors.Is(err, bolt.ErrChecksum) || errors.Is(err, bolt.ErrInvalidMapping) {
		return true
	}
	// bbolt reports these without a sentinel (db.go: fileSize, mmapSize).
	msg := err.Error()
	return strings.Contains(msg, "file size too small") || strings.Contains(msg, "mmap too large")
}

// guard runs f, turning a panic or a memory fault (a truncated mmap) into a
// corruptError. bbolt panics on some inconsistent pages.
func guard(f func() error) (err error) {
	old := debug.SetPanicOnFault(true)
	defer debug.SetPanicOnFault(old)
	defer func() {
		if r := recover(); r != nil {
			err = &corruptError{fmt.Errorf("panic in bbolt: %v", r)}
		}
	}()
	return f()
}

// openLocked calls bolt.Open, waiting for the file lock in short steps so
// that ctx is honoured, for at most the lock timeout.
func (c *Cache) openLocked(ctx context.Context) (*bolt.DB, error) {
	deadline := time.Now().Add(c.lockTimeout)
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		step := min(time.Until(deadline), 200*time.Millisecond)
		if step <= 0 {
			step = time.Millisecond // bbolt treats 0 as "wait forever"
		}
		var db *bolt.DB
		err := guard(func() error {
			var err error
			db, err = bolt.Open(c.path, 0o600, &bolt.Options{Timeout: step})
			return err
		})
		if errors.Is(err, bolt.ErrTimeout) && time.Now().Before(deadline) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("open bbolt: %w", err)
		}
		return db, nil
	}
}

// load creates the bucket, reads every entry (touching every page, so a
// damaged file is found now rather than on a later read) and deletes expired
// and undecodable entries.
func (c *Cache) load(db *bolt.DB) error {
	now := c.now()
	var drop [][]byte
	invalid := 0
	loaded := map[key]entry{}
	in := newInterner()
	err := guard(func() error {
		return db.Update(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucketIfNotExists(bucketName)
			if err != nil {
				return &corruptError{fmt.Errorf("create bucket: %w", err)}
			}
			err = b.ForEach(func(k, v []byte) error {
				var rec record
				if err := json.Unmarshal(v, &rec); err != nil || !rec.Expires.After(now) ||
					string(k) != diskKey(rec.Result.Digest, rec.Result.Fingerprint) {
					drop = append(drop, slices.Clone(k))
					return nil
				}
				if !validVerdict(rec.Result.Verdict) {
					// Not written by this cache: corrupt, never served.
					invalid++
					drop = append(drop, slices.Clone(k))
					return nil
				}
				rec.Result.Source = verdict.SourceCache
				in.result(&rec.Result)
				loaded[key{rec.Result.Digest, rec.Result.Fingerprint}] = entry{rec.Result, rec.Expires}
				return nil
			})
			if err != nil {
				return fmt.Errorf("read entries: %w", err)
			}
			for _, k := range drop {
				if err := b.Delete(k); err != nil {
					return fmt.Errorf("prune entry: %w", err)
				}
			}
			return nil
		})
	})
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.mem = loaded
	c.mu.Unlock()
	if invalid > 0 {
		c.log.Warn("verdict cache held records with an unknown verdict; dropped as corrupt", "records", invalid)
	}
	c.log.Info("verdict cache loaded", "entries", len(loaded), "pruned", len(drop))
	return nil
}

// validVerdict reports whether v is one of the five verdicts.
func validVerdict(v verdict.Verdict) bool { return slices.Contains(verdict.All, v) }

// interner makes the entries of a load share their repeated strings: at
// 10,000 entries under one policy, the policy name, fingerprint, verdict and
// signer list would otherwise be held 10,000 times.
type interner struct {
	strs    map[string]string
	signers map[string][]string
}

func newInterner() *interner {
	return &interner{strs: map[string]string{}, signers: map[string][]string{}}
}

func (in *interner) str(s string) string {
	if c, ok := in.strs[s]; ok {
		return c
	}
	in.strs[s] = s
	return s
}

// result interns r's shared fields in place. The Signers slice may be shared
// between entries; it is clipped, and never modified (Get hands it out as is).
func (in *interner) result(r *verdict.Result) {
	r.Verdict = verdict.Verdict(in.str(string(r.Verdict)))
	r.Reason = in.str(r.Reason)
	r.Policy = in.str(r.Policy)
	r.Fingerprint = in.str(r.Fingerprint)
	r.Detail = in.str(r.Detail)
	if len(r.Signers) == 0 {
		return
	}
	k := strings.Join(r.Signers, "\x00")
	if c, ok := in.signers[k]; ok {
		r.Signers = c
		return
	}
	for i, s := range r.Signers {
		r.Signers[i] = in.str(s)
	}
	r.Signers = slices.Clip(r.Signers)
	in.signers[k] = r.Signers
}

func (c *Cache) moveAside(cause error) error {
	c.corrupt.Add(1)
	if c.corruptObs != nil {
		c.corruptObs.CacheCorrupt()
	}
	base := fmt.Sprintf("%s.corrupt-%d", c.path, c.now().Unix())
	dst := base
	for i := 1; ; i++ {
		if _, err := os.Lstat(dst); errors.Is(err, os.ErrNotExist) {
			break
		}
		dst = fmt.Sprintf("%s-%d", base, i)
	}
	if err := os.Rename(c.path, dst); err != nil {
		return fmt.Errorf("move corrupt cache file aside: %w", err)
	}
	c.log.Warn("verdict cache file was corrupt; moved aside and rebuilt", "movedTo", dst, "err", cause)
	return nil
}

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

// kick wakes the writer without blocking.
func (c *Cache) kick() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// Close flushes pending writes and closes the file. It is idempotent; later
// calls return the first call's result. The cache keeps answering Get from
// memory after Close, and Put only updates memory.
func (c *Cache) Close() error {
	c.closeOnce.Do(func() {
		close(c.stop)
		<-c.done
		c.mu.Lock()
		db := c.db
		c.db = nil
		c.pending = pendingOps{puts: map[key]entry{}}
		c.mu.Unlock()
		if db != nil {
			if err := db.Close(); err != nil {
				c.closeErr = fmt.Errorf("close cache %s: %w", c.path, err)
			}
		}
	})
	return c.closeErr
}

// writer applies pending operations in batches until Close.
func (c *Cache) writer() {
	defer close(c.done)
	var timer *time.Timer
	for {
		select {
		case <-c.stop:
			c.flush()
			return
		case <-c.wake:
		}
		if c.flushDelay > 0 {
			if timer == nil {
				timer = time.NewTimer(c.flushDelay)
			} else {
				timer.Reset(c.flushDelay)
			}
			select {
			case <-c.stop:
				timer.Stop()
				c.flush()
				return
			case <-timer.C:
			}
		}
		c.flush()
	}
}

// flush writes the pending operations in one transaction. On failure the
// operations are dropped (memory still holds the truth), counted and logged.
func (c *Cache) flush() {
	c.flushMu.Lock()
	defer c.flushMu.Unlock()
	c.mu.Lock()
	ops := c.pending
	c.pending = pendingOps{puts: map[key]entry{}}
	db := c.db
	c.mu.Unlock()
	if db == nil || ops.empty() {
		return
	}
	err := guard(func() error { return db.Update(func(tx *bolt.Tx) error { return apply(tx, ops) }) })
	if err != nil {
		c.writeErr.Add(1)
		if c.obs != nil {
			c.obs.CacheWriteError()
		}
		if !c.writeFailing.Swap(true) {
			c.log.Warn("verdict cache write failed; verdicts are kept in memory", "err", err)
		}
		return
	}
	if c.writeFailing.Swap(false) {
		c.log.Info("verdict cache writes work again")
	}
}

func apply(tx *bolt.Tx, ops pendingOps) error {
	b, err := tx.CreateBucketIfNotExists(bucketName)
	if err != nil {
		return fmt.Errorf("bucket: %w", err)
	}
	if ops.keep != nil || len(ops.deletes) > 0 {
		var drop [][]byte
		err := b.ForEach(func(k, _ []byte) error {
			digest, fp, _ := strings.Cut(string(k), "\x00")
			if (ops.keep != nil && !ops.keep[fp]) || ops.deletes[digest] {
				drop = append(drop, slices.Clone(k))
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("scan: %w", err)
		}
		for _, k := range drop {
			if err := b.Delete(k); err != nil {
				return fmt.Errorf("delete: %w", err)
			}
		}
	}
	for k := range ops.expired {
		if err := b.Delete([]byte(diskKey(k.digest, k.fingerprint))); err != nil {
			return fmt.Errorf("delete expired: %w", err)
		}
	}
	for k, e := range ops.puts {
		v, err := json.Marshal(record{Result: e.res, Expires: e.expires})
		if err != nil {
			return fmt.Errorf("encode %s: %w", k.digest, err)
		}
		if err := b.Put([]byte(diskKey(k.digest, k.fingerprint)), v); err != nil {
			return fmt.Errorf("put %s: %w", k.digest, err)
		}
	}
	return nil
}
