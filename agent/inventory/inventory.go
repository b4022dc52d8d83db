// Package inventory keeps the node's images current: one entry per image
// manifest digest, with the tags that point at it and the running containers
// that use it, built from the runtime's CRI view joined with containerd's
// image store and kept current from containerd's image events, a periodic
// full relist, and a full relist after every reconnect.
package inventory

import (
	"cmp"
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/distribution/reference"

	"github.com/pinwarden/pinwarden/cri"
)

// Runtime is what the inventory needs from the container runtime; cri.Client
// implements it.
type Runtime interface {
	// ListImages lists every CRI image.
	ListImages(ctx context.Context) ([]cri.Image, error)
	// ImageStatus returns the image a name refers to, or nil, nil.
	ImageStatus(ctx context.Context, ref string) (*cri.Image, error)
	// ListContainers lists running containers.
	ListContainers(ctx context.Context) ([]cri.Container, error)
	// ImageTargets maps every containerd image name to its target digest.
	ImageTargets(ctx context.Context) (map[string]string, error)
	// ImageTarget returns one name's target digest or an error matching
	// cri.ErrNotFound.
	ImageTarget(ctx context.Context, name string) (string, error)
	// Events subscribes to image events; the subscription is open when it
	// returns; the error channel receives one error when the stream ends.
	Events(ctx context.Context) (<-chan cri.Event, <-chan error)
}

// Observer receives the inventory's health signals (metrics hooks). Calls
// come from the Run goroutine and must not block.
type Observer interface {
	RuntimeUp(up bool)
	RuntimeEvent(topic string)
	Resynced(at time.Time)
}

// RepairObserver is optionally implemented by an Observer to count the
// digests a periodic relist found changed although no event said so (lost
// events).
type RepairObserver interface {
	RelistRepaired(digests int)
}

// ContainerRef is a running container that uses an image.
type ContainerRef struct {
	ID           string
	Name         string
	Image        string // the reference in the container spec
	PodNamespace string
	PodName      string
}

// Image is one image digest on the node.
type Image struct {
	// Digest is the manifest (or index) digest; for an image without a repo
	// digest (imported, side-loaded) it is the image ID.
	Digest  string
	ImageID string // config digest
	// Repos are the repositories the digest is known by, those of its repo
	// digests and of its tags, sorted: what policies are matched against.
	Repos []string
	Tags  []string // "repo:tag" currently pointing at Digest, sorted
	// Containers are the running containers using this digest.
	Containers []ContainerRef
}

// Option configures New.
type Option func(*Inventory)

// WithResyncInterval sets the full relist interval (default 5 minutes).
func WithResyncInterval(d time.Duration) Option {
	return func(inv *Inventory) {
		if d > 0 {
			inv.resync = d
		}
	}
}

// WithContainerResync sets how often running containers are relisted between
// full relists (default 30 seconds). containerd's task and container events
// make a start or stop seen within a few seconds; this relist repairs what
// an event stream lost.
func WithContainerResync(d time.Duration) Option {
	return func(inv *Inventory) {
		if d > 0 {
			inv.containerResync = d
		}
	}
}

// WithBackoff sets the reconnect backoff: base doubles per failed attempt up
// to limit, with jitter (defaults 200ms and 30s).
func WithBackoff(base, limit time.Duration) Option {
	return func(inv *Inventory) {
		if base > 0 {
			inv.backoffBase = base
		}
		if limit >= inv.backoffBase {
			inv.backoffCap = limit
		}
	}
}

// WithObserver sets the metrics hooks.
func WithObserver(o Observer) Option {
	return func(inv *Inventory) {
		if o != nil {
			inv.observer = o
		}
	}
}

// Inventory is the node's image inventory. Queries are safe from any
// goroutine; Run must be called once.
type Inventory struct {
	rt              Runtime
	logger          *slog.Logger
	observer        Observer
	resync          time.Duration
	containerResync time.Duration
	backoffBase     time.Duration
	backoffCap      time.Duration

	// mu guards st, gen, ready and up. Only the Run goroutine writes them,
	// always under mu.Lock; it may read them without mu. Queries take
	// mu.RLock. A full relist builds a new state and swaps the pointer.
	// Every change of st increments gen.
	mu    sync.RWMutex
	st    *state
	gen   uint64
	ready bool
	up    bool

	// viewMu guards view and viewGen: the sorted image list of state
	// generation viewGen, built by View (under mu.RLock) and shared by its
	// callers.
	viewMu  sync.Mutex
	view    []Image
	viewGen uint64

	// upKnown is touched only by the Run goroutine.
	upKnown bool

	subs subscribers
}

// New returns an inventory of rt's images. Call Run to fill it.
func New(rt Runtime, logger *slog.Logger, opts ...Option) *Inventory {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	inv := &Inventory{
		rt:              rt,
		logger:          logger,
		observer:        nopObserver{},
		resync:          5 * time.Minute,
		containerResync: 30 * time.Second,
		backoffBase:     200 * time.Millisecond,
		backoffCap:      30 * time.Second,
		st:              newState(0),
	}
	for _, o := range opts {
		o(inv)
	}
	return inv
}

type nopObserver struct{}

func (nopObserver) RuntimeUp(bool)      {}
func (nopObserver) RuntimeEvent(string) {}
func (nopObserver) Resynced(time.Time)  {}

// Ready reports whether the first full list has completed. It stays true
// while the runtime is down (the last known state is served).
func (inv *Inventory) Ready() bool {
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	return inv.ready
}

// RuntimeUp reports whether the runtime connection is currently healthy.
func (inv *Inventory) RuntimeUp() bool {
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	return inv.up
}

// Snapshot returns every image, sorted by digest. The result is a copy.
func (inv *Inventory) Snapshot() []Image {
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	out := make([]Image, 0, len(inv.st.entries))
	for d, e := range inv.st.entries {
		out = append(out, e.copyWith(inv.st.byContainer[d]))
	}
	slices.SortFunc(out, func(a, b Image) int { return cmp.Compare(a.Digest, b.Digest) })
	return out
}

// View returns every image, sorted by digest, like Snapshot, but shared:
// callers must not modify the result or its slices. It is rebuilt only
// after the inventory changed, so an unchanged node costs nothing to
// publish again.
func (inv *Inventory) View() []Image {
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	inv.viewMu.Lock()
	defer inv.viewMu.Unlock()
	if inv.view != nil && inv.viewGen == inv.gen {
		return inv.view
	}
	out := make([]Image, 0, len(inv.st.entries))
	for d, e := range inv.st.entries {
		e.Containers = inv.st.byContainer[d]
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b Image) int { return cmp.Compare(a.Digest, b.Digest) })
	inv.view, inv.viewGen = out, inv.gen
	return out
}

// Digests returns the digest of every image, sorted: what Snapshot gives
// without copying the images.
func (inv *Inventory) Digests() []string {
	inv.mu.RLock()
	out := make([]string, 0, len(inv.st.entries))
	for d := range inv.st.entries {
		out = append(out, d)
	}
	inv.mu.RUnlock()
	slices.Sort(out)
	return out
}

// Get returns the image with digest (or image ID, for an image without repo
// digest).
func (inv *Inventory) Get(digest string) (Image, bool) {
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	e, ok := inv.st.entries[digest]
	if !ok {
		return Image{}, false
	}
	return e.copyWith(inv.st.byContainer[digest]), true
}

// DigestForTag returns the digest repoTag points at now. repoTag may be
// given in short Docker form ("nginx:1.27" is docker.io/library/nginx:1.27).
func (inv *Inventory) DigestForTag(repoTag string) (string, bool) {
	key := normalizeTag(repoTag)
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	d, ok := inv.st.byTag[key]
	return d, ok
}

// ContainersUsing returns the running containers using digest.
func (inv *Inventory) ContainersUsing(digest string) []ContainerRef {
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	return slices.Clone(inv.st.byContainer[digest])
}

func (e Image) copyWith(cs []ContainerRef) Image {
	e.Repos = slices.Clone(e.Repos)
	e.Tags = slices.Clone(e.Tags)
	e.Containers = slices.Clone(cs)
	return e
}

// normalizeTag turns a reference into the "repo:tag" form containerd stores;
// input that does not parse is returned unchanged.
func normalizeTag(s string) string {
	n, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		return s
	}
	if t, ok := n.(reference.NamedTagged); ok {
		return t.String()
	}
	return s
}
