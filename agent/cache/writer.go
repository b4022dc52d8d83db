package cache

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

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
