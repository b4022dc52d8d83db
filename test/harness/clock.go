package harness

import (
	"sync"
	"time"
)

// Clock is a settable fake clock for code that takes a now func (cache,
// judge): time moves only when the test calls Advance. It is safe for
// concurrent use. Code that sleeps or uses timers is tested in a
// testing/synctest bubble instead.
type Clock struct {
	mu sync.Mutex // guards t
	t  time.Time
}

// NewClock returns a clock at 2026-01-02 03:04:05 UTC.
func NewClock() *Clock { return &Clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}
