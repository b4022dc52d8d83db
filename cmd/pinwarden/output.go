package main

import (
	"io"
	"os"
	"sync"
)

// lockedWriter serializes writes to one io.Writer. The logger and
// `pinwarden prefetch`'s progress display both write to stderr from
// different goroutines; every Write of either goes through one lockedWriter,
// so each log record and each progress frame lands whole and the writes never
// race (a bytes.Buffer in tests, a terminal's line state in real use).
type lockedWriter struct {
	mu sync.Mutex // guards w
	w  io.Writer
}

// lockWriter wraps w, unless it is already a lockedWriter.
func lockWriter(w io.Writer) io.Writer {
	if _, ok := w.(*lockedWriter); ok {
		return w
	}
	return &lockedWriter{w: w}
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// file returns the *os.File under w, if any (for terminal detection).
func file(w io.Writer) (*os.File, bool) {
	if l, ok := w.(*lockedWriter); ok {
		w = l.w
	}
	f, ok := w.(*os.File)
	return f, ok
}
