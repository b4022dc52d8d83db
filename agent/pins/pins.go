// Package pins parses pin files: plain text, one image reference a line, each
// naming a digest (optionally with the tag it pins), '#' starting a comment.
//
//	registry.example.com/shop/api:v2.1@sha256:<64 hex>   # tag pinned to a digest
//	registry.example.com/shop/worker@sha256:<64 hex>     # digest only
//
// A file with any invalid line is rejected whole, with every invalid line
// named (file:line and why). Repositories are normalized the Docker way
// (nginx is docker.io/library/nginx).
package pins

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/pinwarden/pinwarden/agent/policy"
)

// MaxFileSize bounds the size of one pin file.
const MaxFileSize = 4 << 20

// maxLineLength bounds one line (a reference is at most a few hundred bytes).
const maxLineLength = 4096

// Pin is one pinned digest, optionally with the tag that must point at it.
type Pin struct {
	Repo   string // normalized: docker.io/library/nginx
	Tag    string // "" for a digest-only pin
	Digest string // sha256:<64 lowercase hex>
	Source string // file:line of the (first) line that pinned it
}

// Ref returns repo@digest, the reference to pull and verify.
func (p Pin) Ref() string { return p.Repo + "@" + p.Digest }

// TagRef returns repo:tag, or "" for a digest-only pin.
func (p Pin) TagRef() string {
	if p.Tag == "" {
		return ""
	}
	return p.Repo + ":" + p.Tag
}

// String returns repo[:tag]@digest.
func (p Pin) String() string {
	if p.Tag == "" {
		return p.Ref()
	}
	return p.TagRef() + "@" + p.Digest
}

// ParseReference parses one reference that must name a digest:
// repo[:tag]@sha256:<64 lowercase hex>. Normalization is policy.ParseReference,
// so a pin and an image on the node can never be normalized differently; the
// only rule added here is that a pin names a sha256 digest.
func ParseReference(ref string) (Pin, error) {
	r, err := policy.ParseReference(ref)
	if err != nil {
		return Pin{}, err
	}
	if r.Digest == "" {
		return Pin{}, fmt.Errorf("reference %q names no digest: a pin must be repo[:tag]@sha256:<64 hex>", ref)
	}
	if !strings.HasPrefix(r.Digest, "sha256:") {
		return Pin{}, fmt.Errorf("reference %q: unsupported digest algorithm: a pin must use sha256", ref)
	}
	return Pin{Repo: r.Repo, Tag: r.Tag, Digest: r.Digest}, nil
}

// Parse reads one pin file. source names it in errors and in Pin.Source. If
// any line is invalid, Parse returns no pins and an error naming every
// invalid line. Exact duplicates are merged; one tag pinned to two digests
// is an error.
func Parse(r io.Reader, source string) ([]Pin, error) {
	lr := &io.LimitedReader{R: r, N: MaxFileSize + 1}
	sc := bufio.NewScanner(lr)
	sc.Buffer(make([]byte, 0, 1024), maxLineLength)
	var (
		pins []Pin
		errs []error
		set  = newSet()
		n    = 0
	)
	for sc.Scan() {
		n++
		line := sc.Text()
		if n == 1 {
			line = strings.TrimPrefix(line, "\ufeff")
		}
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		at := fmt.Sprintf("%s:%d", source, n)
		if f := strings.Fields(line); len(f) > 1 {
			errs = append(errs, fmt.Errorf("%s: unexpected text %q after the reference (one reference a line)", at, f[1]))
			continue
		}
		p, err := ParseReference(line)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", at, err))
			continue
		}
		p.Source = at
		added, err := set.add(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if added {
			pins = append(pins, p)
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			err = fmt.Errorf("line longer than %d bytes", maxLineLength)
		}
		errs = append(errs, fmt.Errorf("%s:%d: %w", source, n+1, err))
	}
	if lr.N <= 0 {
		errs = append(errs, fmt.Errorf("%s: file larger than %d bytes", source, MaxFileSize))
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("pin file %s rejected: %w", source, errors.Join(errs...))
	}
	return pins, nil
}

// LoadFiles reads and merges the pin files at paths. Any invalid file, or a
// tag pinned to different digests in two files, fails the whole load with
// every problem named; the caller keeps its previous pins.
func LoadFiles(paths []string) ([]Pin, error) {
	var (
		all  []Pin
		errs []error
		set  = newSet()
	)
	for _, path := range paths {
		ps, err := loadFile(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, p := range ps {
			added, err := set.add(p)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if added {
				all = append(all, p)
			}
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return all, nil
}

func loadFile(path string) ([]Pin, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("pin file: %w", err)
	}
	defer func() { _ = f.Close() }() // read-only: a close error changes nothing
	return Parse(f, path)
}

// set detects duplicates: exact duplicates are merged, a tag pinned to two
// digests is a conflict.
type set struct {
	tags map[string]Pin  // repo:tag -> first pin
	refs map[string]bool // repo:tag@digest or repo@digest seen
}

func newSet() *set { return &set{tags: map[string]Pin{}, refs: map[string]bool{}} }

// add records p; it returns false for an exact duplicate and an error for a
// conflicting one.
func (s *set) add(p Pin) (bool, error) {
	if s.refs[p.String()] {
		return false, nil
	}
	if p.Tag != "" {
		if prev, ok := s.tags[p.TagRef()]; ok {
			return false, fmt.Errorf("%s: %s pinned to %s, but %s pins it to %s",
				p.Source, p.TagRef(), p.Digest, prev.Source, prev.Digest)
		}
		s.tags[p.TagRef()] = p
	}
	s.refs[p.String()] = true
	return true, nil
}
