package cache

import (
	"testing"
	"time"
)

// BenchmarkCacheHit guards the hit path that every runtime event and every
// resync goes through: it must stay at or below 1 µs/op and allocate nothing.
func BenchmarkCacheHit(b *testing.B) {
	const n = 10000
	c, digests := filledCache(b, n)
	b.ReportAllocs()
	b.ResetTimer()
	i := 0
	for b.Loop() {
		if _, ok := c.Get(digests[i%n], "fp"); !ok {
			b.Fatal("miss")
		}
		i++
	}
}

// BenchmarkCacheHitParallel is the hit path under concurrent readers (RWMutex).
func BenchmarkCacheHitParallel(b *testing.B) {
	const n = 1024
	c, digests := filledCache(b, n)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, ok := c.Get(digests[i%n], "fp"); !ok {
				b.Error("miss")
				return
			}
			i++
		}
	})
}

// BenchmarkCachePut measures Put including the background bbolt writes
// (flushed by Close inside the timed region), so a slow disk path shows up.
func BenchmarkCachePut(b *testing.B) {
	c, err := Open(b.Context(), PathIn(b.TempDir()))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c.Put(result(i%50000, "fp"), time.Hour)
		i++
	}
	if err := c.Close(); err != nil {
		b.Fatal(err)
	}
}

// filledCache opens a cache holding n verified entries under fingerprint
// "fp" and returns it with their digests; it is closed when b ends.
func filledCache(b *testing.B, n int) (*Cache, []string) {
	b.Helper()
	c, err := Open(b.Context(), PathIn(b.TempDir()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	digests := make([]string, n)
	for i := range n {
		c.Put(result(i, "fp"), time.Hour)
		digests[i] = digest(i)
	}
	return c, digests
}
