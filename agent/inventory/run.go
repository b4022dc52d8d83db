package inventory

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/pinwarden/pinwarden/cri"
)

// Retries of an event whose name CRI does not (yet) agree on with
// containerd: CRI updates its own cache after containerd publishes the event.
const (
	eventRetryBase = 50 * time.Millisecond
	eventRetryMax  = 6 // 50ms .. 1.6s, then the periodic relist repairs
)

// containerRechecks are when, after a task or container event, the running
// containers are listed again. containerd publishes the event before its CRI
// plugin has updated the container's state (it does so when the task call
// returns, or when its own event handler runs), so one list right away could
// still see the old state; the first check also coalesces the burst of events
// of one pod start. A state CRI takes longer to show waits for the container
// relist (WithContainerResync).
var containerRechecks = []time.Duration{20 * time.Millisecond, 250 * time.Millisecond, time.Second, 3 * time.Second}

// Run fills the inventory and keeps it current until ctx is cancelled, then
// returns nil. Runtime failures never end Run: it marks the runtime down,
// reconnects with capped exponential backoff and jitter, and relists fully
// on reconnect so that nothing that happened meanwhile is missed.
func (inv *Inventory) Run(ctx context.Context) error {
	attempt, backoff := 0, inv.reconnectBackoff()
	for {
		connected, err := inv.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		inv.setUp(false)
		if connected {
			attempt, backoff = 0, inv.reconnectBackoff()
		}
		delay := backoff.Step()
		attempt++
		inv.logger.WarnContext(ctx, "runtime connection lost", "error", err, "retry_in", delay, "attempt", attempt)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// reconnectBackoff is the backoff between reconnect attempts: the base,
// doubling up to the cap, each wait plus up to 10% jitter so that the agents
// of a fleet do not reconnect in step.
func (inv *Inventory) reconnectBackoff() wait.Backoff {
	return wait.Backoff{Duration: inv.backoffBase, Factor: 2, Jitter: 0.1, Steps: math.MaxInt32, Cap: inv.backoffCap}
}

func (inv *Inventory) setUp(up bool) {
	if inv.upKnown && inv.up == up {
		return
	}
	inv.mu.Lock()
	inv.up = up
	inv.mu.Unlock()
	inv.upKnown = true
	inv.observer.RuntimeUp(up)
}

type retryItem struct {
	due     time.Time
	attempt int
}

// session runs one connection: subscribe, relist, then follow events. It
// returns connected=true when the relist succeeded.
func (inv *Inventory) session(ctx context.Context) (connected bool, err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	evc, errc := inv.rt.Events(sctx)
	select {
	case err := <-errc:
		return false, err
	default:
	}
	if err := inv.relist(sctx, false); err != nil {
		return false, err
	}
	inv.setUp(true)
	inv.logger.InfoContext(ctx, "runtime connected", "images", inv.count())

	full := time.NewTicker(inv.resync)
	defer full.Stop()
	conts := time.NewTicker(inv.containerResync)
	defer conts.Stop()
	retries := map[string]retryItem{}
	var retryC <-chan time.Time
	var retryT *time.Timer
	// recheck lists the containers at each of recheckAt (sorted), after a
	// container event.
	var recheckAt []time.Time
	recheckT := time.NewTimer(time.Hour)
	recheckT.Stop()
	defer func() {
		if retryT != nil {
			retryT.Stop()
		}
		recheckT.Stop()
	}()
	for {
		// Arm the retry timer for the earliest due name.
		retryC = nil
		if len(retries) > 0 {
			next := time.Time{}
			for _, it := range retries {
				if next.IsZero() || it.due.Before(next) {
					next = it.due
				}
			}
			if retryT == nil {
				retryT = time.NewTimer(time.Until(next))
			} else {
				retryT.Reset(time.Until(next))
			}
			retryC = retryT.C
		}
		select {
		case <-ctx.Done():
			return true, nil
		case err := <-errc:
			return true, err
		case ev := <-evc:
			inv.observer.RuntimeEvent(ev.Topic)
			if ev.IsContainer() {
				now := time.Now()
				if len(recheckAt) == len(containerRechecks) && recheckAt[0].After(now) {
					continue // the burst of one pod start: already scheduled
				}
				recheckAt = recheckAt[:0]
				for _, d := range containerRechecks {
					recheckAt = append(recheckAt, now.Add(d))
				}
				recheckT.Reset(containerRechecks[0])
				continue
			}
			ok, err := inv.handleName(sctx, ev.Name)
			if err != nil {
				if connectionLost(sctx, err) {
					return true, err
				}
				// One odd name must not take the runtime "down": the
				// next relist settles it.
				inv.logger.WarnContext(ctx, "image event lookup failed; left to relist", "name", ev.Name, "error", err)
				ok = true
			}
			if ok {
				delete(retries, ev.Name)
			} else {
				retries[ev.Name] = retryItem{due: time.Now().Add(eventRetryBase)}
			}
		case now := <-retryC:
			for name, it := range retries {
				if it.due.After(now) {
					continue
				}
				ok, err := inv.handleName(sctx, name)
				if err != nil {
					if connectionLost(sctx, err) {
						return true, err
					}
					inv.logger.WarnContext(ctx, "image event lookup failed; left to relist", "name", name, "error", err)
					ok = true
				}
				if ok || it.attempt+1 >= eventRetryMax {
					if !ok {
						inv.logger.DebugContext(ctx, "runtime views disagree on image name; left to relist", "name", name)
					}
					delete(retries, name)
					continue
				}
				retries[name] = retryItem{due: now.Add(eventRetryBase << (it.attempt + 1)), attempt: it.attempt + 1}
			}
		case <-full.C:
			if err := inv.relist(sctx, true); err != nil {
				return true, err
			}
			clear(retries)
		case <-conts.C:
			if err := inv.relistContainers(sctx); err != nil {
				return true, err
			}
		case now := <-recheckT.C:
			for len(recheckAt) > 0 && !recheckAt[0].After(now) {
				recheckAt = recheckAt[1:]
			}
			if len(recheckAt) > 0 {
				recheckT.Reset(time.Until(recheckAt[0]))
			}
			if err := inv.relistContainers(sctx); err != nil {
				return true, err
			}
		}
	}
}

func (inv *Inventory) count() int {
	inv.mu.RLock()
	defer inv.mu.RUnlock()
	return len(inv.st.entries)
}

// connectionLost reports whether err means the session is over (runtime
// gone or unresponsive, or we are stopping) rather than one failed lookup.
func connectionLost(ctx context.Context, err error) bool {
	return ctx.Err() != nil || errors.Is(err, cri.ErrUnavailable)
}

// relist replaces the whole state from full lists. periodic marks the
// resync relist, whose differences are changes the events missed.
func (inv *Inventory) relist(ctx context.Context, periodic bool) error {
	// The two lists are independent calls: run them at once.
	var (
		images     []cri.Image
		containers []cri.Container
	)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) { images, err = inv.rt.ListImages(gctx); return err })
	g.Go(func() (err error) { containers, err = inv.rt.ListContainers(gctx); return err })
	if err := g.Wait(); err != nil {
		return fmt.Errorf("relist: %w", err)
	}
	targets, err := inv.targetsFor(ctx, images)
	if err != nil {
		return fmt.Errorf("relist: %w", err)
	}
	ns := buildState(images, targets, containers)

	inv.mu.Lock()
	old := inv.st
	inv.st = ns
	inv.gen++
	inv.ready = true
	inv.mu.Unlock()

	imgChanged := diffEntries(old.entries, ns.entries)
	contChanged := diffContainers(old.byContainer, ns.byContainer)
	if periodic && len(imgChanged) > 0 {
		// containerd never replays events: these were dropped (or are
		// still in flight). Containers have no events; they do not count.
		inv.logger.InfoContext(ctx, "relist repaired changes the event stream missed", "digests", len(imgChanged))
		if r, ok := inv.observer.(RepairObserver); ok {
			r.RelistRepaired(len(imgChanged))
		}
	}
	changed := append(imgChanged, contChanged...)
	slices.Sort(changed)
	changed = slices.Compact(changed)
	inv.observer.Resynced(time.Now())
	inv.notify(changed, len(contChanged) > 0 || !slices.Equal(old.containers, ns.containers), true)
	return nil
}

// maxTargetLookups is where one full containerd image list becomes cheaper
// than looking names up one by one.
const maxTargetLookups = 256

// targetsFor returns the containerd targets that derive needs for images:
// the ID and tags of an image without a repo digest, the tags of an image
// with several digests. An image with one repo digest needs none, CRI's own
// list says where its tags point; that is nearly every image, so a relist
// of 10,000 images does not decode containerd's 20,000 image records (at
// 10k: ~0.5 s and ~40 MB of garbage).
func (inv *Inventory) targetsFor(ctx context.Context, images []cri.Image) (map[string]string, error) {
	var names []string
	for i := range images {
		names = append(names, neededTargets(&images[i])...)
	}
	if len(names) > maxTargetLookups {
		return inv.rt.ImageTargets(ctx)
	}
	return inv.lookupTargets(ctx, names)
}

// neededTargets lists the containerd names whose target derive looks up for
// im (see targetsFor).
func neededTargets(im *cri.Image) []string {
	switch {
	case len(im.RepoDigests) == 0:
		return append([]string{im.ID}, im.RepoTags...)
	case len(im.RepoTags) > 0 && manyDigests(im.RepoDigests):
		return im.RepoTags
	}
	return nil
}

// lookupTargets asks containerd for the target of each name; a name it does
// not know is left out.
func (inv *Inventory) lookupTargets(ctx context.Context, names []string) (map[string]string, error) {
	out := make(map[string]string, len(names))
	for _, n := range names {
		d, err := inv.rt.ImageTarget(ctx, n)
		switch {
		case errors.Is(err, cri.ErrNotFound):
		case err != nil:
			return nil, err
		default:
			out[n] = d
		}
	}
	return out, nil
}

// manyDigests reports whether repo@digest names carry more than one digest.
func manyDigests(repoDigests []string) bool {
	first := ""
	for _, rd := range repoDigests {
		_, d, _ := strings.Cut(rd, "@")
		if first == "" {
			first = d
		} else if d != first {
			return true
		}
	}
	return false
}

// relistContainers refreshes only the running containers.
func (inv *Inventory) relistContainers(ctx context.Context) error {
	containers, err := inv.rt.ListContainers(ctx)
	if err != nil {
		return fmt.Errorf("list containers: %w", err)
	}
	if slices.Equal(containers, inv.st.containers) {
		return nil
	}
	inv.mu.Lock()
	old := inv.st.byContainer
	inv.st.containers = containers
	inv.st.byContainer = inv.st.joinContainers()
	nw := inv.st.byContainer
	inv.gen++
	inv.mu.Unlock()
	inv.notify(diffContainers(old, nw), true, false)
	return nil
}

// handleName brings one containerd image name up to date. It reports false
// when CRI and containerd do not agree on the name yet (to be retried).
func (inv *Inventory) handleName(ctx context.Context, name string) (bool, error) {
	target, err := inv.rt.ImageTarget(ctx, name)
	switch {
	case errors.Is(err, cri.ErrNotFound):
		target = ""
	case err != nil:
		return false, err
	}
	img, err := inv.rt.ImageStatus(ctx, name)
	if err != nil {
		return false, err
	}
	consistent := (target == "" && img == nil) || (target != "" && img != nil && hasName(img, name))

	// Images that carried the name, or any name img carries now, may have
	// lost it (tag moved, tag deleted, image removed): refresh them by ID.
	claimed := []string{name}
	if img != nil {
		claimed = names(*img)
	}
	var others []string
	for _, n := range claimed {
		if o := inv.st.owner[n]; o != "" && (img == nil || o != img.ID) && !slices.Contains(others, o) {
			others = append(others, o)
		}
	}
	if o := inv.st.owner[name]; o != "" && (img == nil || o != img.ID) && !slices.Contains(others, o) {
		others = append(others, o)
	}
	otherImgs := make([]*cri.Image, len(others))
	for i, o := range others {
		if otherImgs[i], err = inv.rt.ImageStatus(ctx, o); err != nil {
			return false, err
		}
	}
	// An image that now needs containerd targets (a second digest, or none)
	// may carry names whose target no relist looked up.
	var need []string
	inv.mu.Lock()
	for _, im := range append([]*cri.Image{img}, otherImgs...) {
		if im == nil {
			continue
		}
		for _, n := range neededTargets(im) {
			if _, ok := inv.st.targets[n]; !ok && n != name {
				need = append(need, n)
			}
		}
	}
	inv.mu.Unlock()
	fetched, err := inv.lookupTargets(ctx, need)
	if err != nil {
		return false, err
	}

	inv.mu.Lock()
	st := inv.st
	inv.gen++
	switch {
	case isDigestName(name):
		// derive reads repo@digest names from the CRI image itself.
	case target != "":
		st.targets[name] = target
	default:
		delete(st.targets, name)
	}
	for n, d := range fetched {
		st.targets[n] = d
	}
	var changed []string
	if img != nil {
		changed = append(changed, st.setImage(img.ID, img)...)
	}
	for i, o := range others {
		changed = append(changed, st.setImage(o, otherImgs[i])...)
	}
	var contChanged []string
	if len(changed) > 0 {
		old := st.byContainer
		st.byContainer = st.joinContainers()
		contChanged = diffContainers(old, st.byContainer)
	}
	inv.mu.Unlock()

	changed = append(changed, contChanged...)
	slices.Sort(changed)
	inv.notify(slices.Compact(changed), false, false)
	return consistent, nil
}
