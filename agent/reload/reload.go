// Package reload watches the config file and every file it names (keys,
// trusted root, docker config, pin files) and calls back when any of them
// changes on disk.
//
// It watches the directories, not the files, so that it also sees the
// symlink swap with which Kubernetes updates a mounted ConfigMap or Secret
// (..data -> ..2026_11_26_...), editors that write a new file and rename it,
// and files that are deleted and created again. A directory that does not
// exist yet (a Secret mounted later) is watched through its nearest existing
// ancestor, and the watch moves down as the directories appear.
package reload

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Watcher calls its callback, debounced, after a watched file changed.
type Watcher struct {
	w        *fsnotify.Watcher
	log      *slog.Logger
	debounce time.Duration
	onChange func()
	onCheck  func(changed bool)
	files    map[string]string // clean path -> last resolved target and mod time
	dirs     map[string]bool
}

// Option configures a Watcher.
type Option func(*Watcher)

// WithCheckHook calls f after every debounced check with whether a watched
// file had changed (tests use it to order events positively).
func WithCheckHook(f func(changed bool)) Option { return func(w *Watcher) { w.onCheck = f } }

// New watches the directories of files. onChange runs on Run's goroutine.
func New(files []string, debounce time.Duration, logger *slog.Logger, onChange func(), opts ...Option) (*Watcher, error) {
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("start file watcher: %w", err)
	}
	w := &Watcher{w: fw, log: logger, debounce: debounce, onChange: onChange, files: map[string]string{}, dirs: map[string]bool{}}
	for _, o := range opts {
		o(w)
	}
	if err := w.Set(files); err != nil {
		fw.Close()
		return nil, err
	}
	return w, nil
}

// Set replaces the watched files (the files named by the config change with
// it). It must be called from the goroutine that runs Run's callback, or
// before Run.
func (w *Watcher) Set(files []string) error {
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
	}
	w.files = newFiles
	return w.syncDirs()
}

// syncDirs watches, for every file, its directory or, while that does not
// exist, its nearest existing ancestor.
func (w *Watcher) syncDirs() error {
	want := map[string]bool{}
	for f := range w.files {
		want[existingDir(filepath.Dir(f))] = true
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
	w.dirs = want
	return nil
}

// existingDir returns dir or its nearest ancestor that is a directory.
func existingDir(dir string) string {
	for {
		if fi, err := os.Stat(dir); err == nil && fi.IsDir() {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return dir
		}
		dir = parent
	}
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
			// Directories first: one that appeared is watched before the
			// files are compared, so nothing written into it is missed.
			if err := w.syncDirs(); err != nil {
				w.log.Warn("file watcher", "err", err)
			}
			changed := w.changed()
			if changed {
				w.onChange()
			}
			if w.onCheck != nil {
				w.onCheck(changed)
			}
		}
	}
}

// relevant reports whether an event in a watched directory may concern a
// watched file: the file itself, any dot-entry (the ..data swap of a
// ConfigMap or Secret), or a directory on the way to a watched file.
func (w *Watcher) relevant(name string) bool {
	if _, ok := w.files[name]; ok {
		return true
	}
	base := filepath.Base(name)
	if len(base) > 1 && base[0] == '.' {
		return true
	}
	prefix := name + string(filepath.Separator)
	for f := range w.files {
		if strings.HasPrefix(f, prefix) {
			return true
		}
	}
	return false
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
