package report

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
)

// reportedFile is the on-disk form of the reported set: digest -> problem ->
// the pods told (sorted). It is small: one entry per problem digest.
type reportedFile struct {
	Version  int                             `json:"version"`
	Node     string                          `json:"node"`
	Reported map[string]map[problem][]string `json:"reported"`
}

const reportedVersion = 1

// loadReported reads the reported set the last run left in the state file,
// so a restart does not send the same Warnings again. A missing, unreadable
// or foreign (other node) file starts empty: at worst events repeat once.
func (w *worker) loadReported() {
	path := w.r.opts.stateFile
	if path == "" {
		return
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	var f reportedFile
	if err == nil {
		err = json.Unmarshal(b, &f)
	}
	if err == nil && f.Version != reportedVersion {
		err = fmt.Errorf("version %d, want %d", f.Version, reportedVersion)
	}
	if err != nil {
		w.r.log.Warn("ignoring the reported-events file; problems may be reported again once", "file", path, "err", err)
		return
	}
	if f.Node != w.r.node {
		return
	}
	for d, ps := range f.Reported {
		m := make(map[problem]map[string]bool, len(ps))
		for p, pods := range ps {
			told := make(map[string]bool, len(pods))
			for _, pod := range pods {
				told[pod] = true
			}
			m[p] = told
		}
		w.reported[d] = m
		w.unseen[d] = true
	}
	w.saved = b
	w.loadedAt = w.r.opts.clock.Now()
}

// saveReported writes the reported set to the state file when it changed
// (write to a temporary file, then rename: a crash leaves the old or the new
// file, never half of one). A failed write is logged and retried on the
// next change.
func (w *worker) saveReported() {
	path := w.r.opts.stateFile
	if path == "" {
		return
	}
	f := reportedFile{Version: reportedVersion, Node: w.r.node, Reported: make(map[string]map[problem][]string, len(w.reported))}
	for d, ps := range w.reported {
		m := make(map[problem][]string, len(ps))
		for p, told := range ps {
			pods := make([]string, 0, len(told))
			for pod := range told {
				pods = append(pods, pod)
			}
			slices.Sort(pods)
			m[p] = pods
		}
		f.Reported[d] = m
	}
	b, err := json.Marshal(f) // map keys are sorted: equal sets give equal bytes
	if err != nil {
		w.r.log.Warn("encoding the reported-events file", "err", err)
		return
	}
	if slices.Equal(b, w.saved) {
		return
	}
	if err := writeAtomic(path, b); err != nil {
		w.r.log.Warn("cannot keep the reported events; a restart may report them again", "file", path, "err", err)
		return
	}
	w.saved = b
}

func writeAtomic(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".reported-*")
	if err != nil {
		return fmt.Errorf("create temporary file: %w", err)
	}
	defer os.Remove(tmp.Name()) // after the rename: nothing to remove
	if _, err := tmp.Write(b); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("sync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rename to %s: %w", path, err)
	}
	return nil
}
