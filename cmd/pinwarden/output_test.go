package main

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/prefetch"
)

// TestLogAndProgressShareStderr: the logger and the progress display write
// to one stderr from two goroutines, as `pinwarden prefetch` does (the
// prefetcher logs from its workers while Once reports progress). Under -race
// this fails unless every write is serialized; every line must land whole.
func TestLogAndProgressShareStderr(t *testing.T) {
	t.Parallel()
	pin, err := pins.ParseReference("registry.example.com/a:v1@sha256:" + strings.Repeat("a", 64))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	stderr := lockWriter(&buf)
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	p := newProgress(stderr, []pins.Pin{pin}, false)
	const n = 200
	var wg sync.WaitGroup
	wg.Go(func() {
		for range n {
			logger.Info("pulled", "image", "registry.example.com/a")
		}
	})
	wg.Go(func() {
		for range n {
			p.update(prefetch.Event{Pin: pin, Phase: prefetch.PhasePulling})
		}
	})
	wg.Wait()
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != 2*n {
		t.Fatalf("%d lines, want %d", len(lines), 2*n)
	}
	for _, l := range lines {
		if !strings.HasPrefix(l, "time=") && !strings.HasPrefix(l, "pulling ") {
			t.Fatalf("torn line %q", l)
		}
	}
	if f, ok := file(stderr); ok || f != nil {
		t.Errorf("file(locked bytes.Buffer) = %v, %v; want none", f, ok)
	}
}
