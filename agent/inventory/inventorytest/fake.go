// Package inventorytest provides an in-memory runtime for inventory tests and
// a conformance suite that runs against both it and the real cri.Client, so
// the fake cannot drift from containerd's behaviour.
package inventorytest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/cri"
)

var _ inventory.Runtime = (*Fake)(nil)

// Fake is an in-memory containerd with the CRI plugin's naming: a pull
// creates the names "sha256:<id>", "repo:tag" and "repo@digest", each a
// containerd image record that targets the manifest digest, and publishes a
// create (or update) event per name. Safe for concurrent use.
type Fake struct {
	mu         sync.Mutex // guards every field below
	records    map[string]record
	sizes      map[string]uint64 // image ID -> size
	containers []cri.Container
	subs       map[*fakeSub]struct{}
	down       bool
	dropEvents bool
	calls      map[string]int
}

type record struct {
	target string // manifest digest
	id     string // image ID (config digest)
}

type fakeSub struct {
	evc  chan cri.Event
	errc chan error
	done chan struct{}
}

// NewFake returns an empty fake runtime.
func NewFake() *Fake {
	return &Fake{records: map[string]record{}, sizes: map[string]uint64{}, subs: map[*fakeSub]struct{}{}, calls: map[string]int{}}
}

// Digest returns a deterministic "sha256:..." for seed.
func Digest(seed string) string {
	h := sha256.Sum256([]byte(seed))
	return "sha256:" + hex.EncodeToString(h[:])
}

// Pull emulates a CRI pull of repoTag (or repo@digest when repoTag has an
// '@'): image id with manifest digest, size bytes. Like containerd it
// retargets an existing tag and publishes the events.
func (f *Fake) Pull(repoTag, digest, id string, size uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	repo := repoTag
	names := []string{id}
	if r, _, ok := strings.Cut(repoTag, "@"); ok {
		repo = r
	} else {
		repo = repoOf(repoTag)
		names = append(names, repoTag)
	}
	names = append(names, repo+"@"+digest)
	f.sizes[id] = size
	for _, n := range names {
		topic := cri.TopicImageCreate
		if _, ok := f.records[n]; ok {
			topic = cri.TopicImageUpdate
		}
		f.records[n] = record{target: digest, id: id}
		f.publish(cri.Event{Topic: topic, Name: n})
	}
}

// Untag deletes one name record (a tag or repo@digest), like
// `ctr -n k8s.io images rm NAME`; the image stays under its other names
// (containerd keeps the "sha256:<id>" record).
func (f *Fake) Untag(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.records[name]; !ok {
		return
	}
	delete(f.records, name)
	f.publish(cri.Event{Topic: cri.TopicImageDelete, Name: name})
}

// Remove deletes every name of the image ref names, like CRI RemoveImage.
func (f *Fake) Remove(ref string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	r, ok := f.records[ref]
	if !ok {
		return
	}
	for _, n := range f.sortedNames() {
		if f.records[n].id == r.id {
			delete(f.records, n)
			f.publish(cri.Event{Topic: cri.TopicImageDelete, Name: n})
		}
	}
	delete(f.sizes, r.id)
}

// SetContainers replaces the running containers without an event, like a
// change that only a container relist sees.
func (f *Fake) SetContainers(cs []cri.Container) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.containers = slices.Clone(cs)
}

// StartContainer adds a running container and publishes its task start
// event, like containerd.
func (f *Fake) StartContainer(c cri.Container) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.containers = append(slices.Clone(f.containers), c)
	f.publish(cri.Event{Topic: cri.TopicTaskStart, Name: c.ID})
}

// StopContainer removes the running container id and publishes its task
// exit event, like containerd.
func (f *Fake) StopContainer(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.containers = slices.DeleteFunc(slices.Clone(f.containers), func(c cri.Container) bool { return c.ID == id })
	f.publish(cri.Event{Topic: cri.TopicTaskExit, Name: id})
}

// SetDown makes every call fail with cri.ErrUnavailable and ends every open
// event stream (down=true), like a stopped containerd.
func (f *Fake) SetDown(down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = down
	if down {
		for s := range f.subs {
			f.endSub(s, fmt.Errorf("event stream: %w", cri.ErrUnavailable))
		}
	}
}

// DropEvents makes the fake lose events (containerd never replays them).
func (f *Fake) DropEvents(drop bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dropEvents = drop
}

// Calls returns how often method was called.
func (f *Fake) Calls(method string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[method]
}

func (f *Fake) enter(method string) error {
	f.calls[method]++
	if f.down {
		return fmt.Errorf("%s: %w", method, cri.ErrUnavailable)
	}
	return nil
}

func (f *Fake) publish(ev cri.Event) {
	if f.dropEvents {
		return
	}
	for s := range f.subs {
		select {
		case s.evc <- ev:
		default:
			// A consumer this far behind lost the stream, like a gRPC
			// subscriber that cannot keep up.
			f.endSub(s, fmt.Errorf("event stream: consumer too slow: %w", cri.ErrUnavailable))
		}
	}
}

func (f *Fake) endSub(s *fakeSub, err error) {
	delete(f.subs, s)
	s.errc <- err
	close(s.done)
}

func (f *Fake) sortedNames() []string {
	out := make([]string, 0, len(f.records))
	for n := range f.records {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// criImage builds the CRI view of image id from the name records.
func (f *Fake) criImage(id string) *cri.Image {
	var im *cri.Image
	for _, n := range f.sortedNames() {
		r := f.records[n]
		if r.id != id {
			continue
		}
		if im == nil {
			im = &cri.Image{ID: id, Size: f.sizes[id]}
		}
		addName(im, n)
	}
	return im
}

func addName(im *cri.Image, n string) {
	switch {
	case n == im.ID:
	case strings.Contains(n, "@"):
		im.RepoDigests = append(im.RepoDigests, n)
	default:
		im.RepoTags = append(im.RepoTags, n)
	}
}

// ListImages implements inventory.Runtime.
func (f *Fake) ListImages(context.Context) ([]cri.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("ListImages"); err != nil {
		return nil, err
	}
	byID := map[string]*cri.Image{}
	for _, n := range f.sortedNames() {
		r := f.records[n]
		im := byID[r.id]
		if im == nil {
			im = &cri.Image{ID: r.id, Size: f.sizes[r.id]}
			byID[r.id] = im
		}
		addName(im, n)
	}
	out := make([]cri.Image, 0, len(byID))
	for _, im := range byID {
		out = append(out, *im)
	}
	slices.SortFunc(out, func(a, b cri.Image) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// ImageStatus implements inventory.Runtime.
func (f *Fake) ImageStatus(_ context.Context, ref string) (*cri.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("ImageStatus"); err != nil {
		return nil, err
	}
	r, ok := f.records[ref]
	if !ok {
		return nil, nil
	}
	return f.criImage(r.id), nil
}

// ListContainers implements inventory.Runtime.
func (f *Fake) ListContainers(context.Context) ([]cri.Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("ListContainers"); err != nil {
		return nil, err
	}
	return slices.Clone(f.containers), nil
}

// ImageTargets implements inventory.Runtime.
func (f *Fake) ImageTargets(context.Context) (map[string]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("ImageTargets"); err != nil {
		return nil, err
	}
	out := make(map[string]string, len(f.records))
	for n, r := range f.records {
		out[n] = r.target
	}
	return out, nil
}

// ImageTarget implements inventory.Runtime.
func (f *Fake) ImageTarget(_ context.Context, name string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("ImageTarget"); err != nil {
		return "", err
	}
	r, ok := f.records[name]
	if !ok {
		return "", fmt.Errorf("containerd image %s: %w", name, cri.ErrNotFound)
	}
	return r.target, nil
}

// Events implements inventory.Runtime. The stream buffers 1024 events; a
// consumer further behind loses the stream with an error.
func (f *Fake) Events(ctx context.Context) (<-chan cri.Event, <-chan error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := &fakeSub{evc: make(chan cri.Event, 1024), errc: make(chan error, 1), done: make(chan struct{})}
	if err := f.enter("Events"); err != nil {
		s.errc <- fmt.Errorf("subscribe: %w", err)
		return s.evc, s.errc
	}
	f.subs[s] = struct{}{}
	go func() {
		select {
		case <-ctx.Done():
			f.mu.Lock()
			if _, ok := f.subs[s]; ok {
				f.endSub(s, ctx.Err())
			}
			f.mu.Unlock()
		case <-s.done:
		}
	}()
	return s.evc, s.errc
}

func repoOf(tag string) string {
	i := strings.LastIndexByte(tag, ':')
	if i < 0 || strings.ContainsRune(tag[i:], '/') {
		return tag
	}
	return tag[:i]
}
