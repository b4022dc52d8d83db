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
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/pinwarden/pinwarden/agent/verdict"
)

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
