// Package reload watches config and pin files and calls back when any of
// them changes on disk.
//
// It watches the directories, not the files, so that it also sees the
// symlink swap with which Kubernetes updates a mounted ConfigMap
// (..data -> ..2026_11_26_...), editors that write a new file and rename it,
// and files that are deleted and created again.
package reload

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Watcher calls its callback, debounced, after a watched file changed.
type Watcher struct {
	w        *fsnotify.Watcher
	log      *slog.Logger
	debounce time.Duration
	onChange func()
	files    map[string]string // clean path -> last resolved target and mod time
	dirs     map[string]bool
}

// New watches the directories of files. onChange runs on Run's goroutine.
func New(files []string, debounce time.Duration, logger *slog.Logger, onChange func()) (*Watcher, error) {
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("start file watcher: %w", err)
	}
	w := &Watcher{w: fw, log: logger, debounce: debounce, onChange: onChange, files: map[string]string{}, dirs: map[string]bool{}}
	if err := w.Set(files); err != nil {
		fw.Close()
		return nil, err
	}
	return w, nil
}

// Set replaces the watched files (the pin list may change with the config).
// It must be called from the goroutine that runs Run's callback, or before Run.
func (w *Watcher) Set(files []string) error {
	want := map[string]bool{}
	newFiles := map[string]string{}
	for _, f := range files {
		abs, err := filepath.Abs(f)
		if err != nil {
			return fmt.Errorf("watch %s: %w", f, err)
		}
		newFiles[abs] = w.files[abs]
		if newFiles[abs] == "" {
			newFiles[abs] = fingerprint(abs)
		}
		want[filepath.Dir(abs)] = true
	}
	for d := range want {
		if !w.dirs[d] {
			if err := w.w.Add(d); err != nil {
				return fmt.Errorf("watch directory %s: %w", d, err)
			}
		}
	}
	for d := range w.dirs {
		if !want[d] {
			_ = w.w.Remove(d) // the directory may be gone already
		}
	}
	w.dirs, w.files = want, newFiles
	return nil
}

// Run delivers change notifications until ctx is done, then closes the watcher.
func (w *Watcher) Run(ctx context.Context) error {
	defer w.w.Close()
	var timer *time.Timer
	var fire <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			if timer != nil {
				timer.Stop()
			}
			return nil
		case ev, ok := <-w.w.Events:
			if !ok {
				return nil
			}
			if !w.relevant(ev.Name) {
				continue
			}
			if timer == nil {
				timer = time.NewTimer(w.debounce)
			} else {
				timer.Reset(w.debounce)
			}
			fire = timer.C
		case err, ok := <-w.w.Errors:
			if !ok {
				return nil
			}
			w.log.Warn("file watcher error", "err", err)
		case <-fire:
			fire = nil
			if w.changed() {
				w.onChange()
			}
		}
	}
}

// relevant reports whether an event in a watched directory may concern a
// watched file: the file itself, or any dot-entry (ConfigMap's ..data swap).
func (w *Watcher) relevant(name string) bool {
	if _, ok := w.files[name]; ok {
		return true
	}
	base := filepath.Base(name)
	return len(base) > 1 && base[0] == '.'
}

// changed reports whether any watched file's content identity changed since
// the last call, so that touching an unrelated file does not reload.
func (w *Watcher) changed() bool {
	diff := false
	for f, old := range w.files {
		if now := fingerprint(f); now != old {
			w.files[f] = now
			diff = true
		}
	}
	return diff
}

// fingerprint identifies a file's current content cheaply: the resolved
// target, its size and modification time.
func fingerprint(path string) string {
	target, err := filepath.EvalSymlinks(path)
	if err != nil {
		return "missing"
	}
	fi, err := os.Stat(target)
	if err != nil {
		return "missing"
	}
	return fmt.Sprintf("%s|%d|%d", target, fi.Size(), fi.ModTime().UnixNano())
}
