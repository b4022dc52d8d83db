package inventory

import (
	"slices"
	"strings"

	"github.com/distribution/reference"

	"github.com/pinwarden/pinwarden/cri"
)

// state is the joined view of the runtime. It is not safe for concurrent
// mutation; see Inventory.mu.
type state struct {
	images map[string]cri.Image // CRI images by image ID
	// targets maps containerd image names (tags and IDs; never
	// "repo@digest", whose target is the digest in the name) to their
	// target digest.
	targets    map[string]string
	owner      map[string]string   // every CRI name (tag, repo@digest, ID) -> image ID
	entries    map[string]Image    // by digest; Containers left empty
	idDigests  map[string][]string // image ID -> digests of its entries
	byTag      map[string]string   // "repo:tag" -> digest
	containers []cri.Container
	// byContainer is derived from containers and entries.
	byContainer map[string][]ContainerRef
}

func newState(n int) *state {
	return &state{
		images:      make(map[string]cri.Image, n),
		targets:     map[string]string{}, // buildState sets the full one
		owner:       make(map[string]string, 3*n),
		entries:     make(map[string]Image, n),
		idDigests:   make(map[string][]string, n),
		byTag:       make(map[string]string, n),
		byContainer: map[string][]ContainerRef{},
	}
}

// buildState builds a state from full lists; it keeps (and trims) targets.
func buildState(images []cri.Image, targets map[string]string, containers []cri.Container) *state {
	st := newState(len(images))
	st.targets = compactTargets(images, targets)
	for i := range images {
		st.setImage(images[i].ID, &images[i])
	}
	st.containers = containers
	st.byContainer = st.joinContainers()
	return st
}

// compactTargets trims targets in place to the names derive can look up
// (every name but "repo@digest", about half of containerd's names), each
// target digest sharing the string of the image's repo digest: at 10,000
// images this keeps about 2 MB less of containerd's image list.
func compactTargets(images []cri.Image, targets map[string]string) map[string]string {
	digests := make(map[string]string, len(images))
	for i := range images {
		for _, rd := range images[i].RepoDigests {
			if _, d, ok := strings.Cut(rd, "@"); ok {
				digests[d] = d
			}
		}
	}
	for name, d := range targets { // in place: no second map of 10,000s of names
		if isDigestName(name) {
			delete(targets, name)
		} else if c, ok := digests[d]; ok {
			targets[name] = c
		}
	}
	return targets
}

// isDigestName reports whether a containerd image name is "repo@digest".
func isDigestName(name string) bool { return strings.Contains(name, "@") }

// setImage replaces (img != nil) or removes (img == nil) the image id and
// returns the digests whose entry changed.
func (st *state) setImage(id string, img *cri.Image) []string {
	var changed []string
	var old map[string]Image // nil (no allocation) for a new image
	if n := len(st.idDigests[id]); n > 0 {
		old = make(map[string]Image, n)
	}
	for _, d := range st.idDigests[id] {
		e, ok := st.entries[d]
		if !ok || e.ImageID != id {
			continue
		}
		old[d] = e
		delete(st.entries, d)
		for _, t := range e.Tags {
			if st.byTag[t] == d {
				delete(st.byTag, t)
			}
		}
	}
	delete(st.idDigests, id)
	if prev, ok := st.images[id]; ok {
		for _, n := range names(prev) {
			if st.owner[n] == id {
				delete(st.owner, n)
			}
		}
		delete(st.images, id)
	}
	if img != nil {
		st.images[id] = *img
		for _, n := range names(*img) {
			st.owner[n] = id
		}
		es := derive(*img, st.targets)
		ds := make([]string, 0, len(es))
		for _, e := range es {
			st.entries[e.Digest] = e
			ds = append(ds, e.Digest)
			for _, t := range e.Tags {
				st.byTag[t] = e.Digest
			}
			if o, ok := old[e.Digest]; !ok || !sameImage(o, e) {
				changed = append(changed, e.Digest)
			}
			delete(old, e.Digest)
		}
		st.idDigests[id] = ds
	}
	for d := range old {
		changed = append(changed, d)
	}
	return changed
}

// names returns every name CRI knows img by.
func names(img cri.Image) []string {
	out := make([]string, 0, 1+len(img.RepoTags)+len(img.RepoDigests))
	out = append(out, img.ID)
	out = append(out, img.RepoTags...)
	return append(out, img.RepoDigests...)
}

func hasName(img *cri.Image, name string) bool {
	return img.ID == name || slices.Contains(img.RepoTags, name) || slices.Contains(img.RepoDigests, name)
}

// derive splits one CRI image into one entry per distinct repo digest (see
// below for an image without one). A tag
// goes to the digest its containerd record targets; without a record it goes
// to the only digest; otherwise nowhere (the next event or relist settles
// it). A tag never creates an entry outside the image's own
// repo digests: its target may be stale while events are still arriving.
func derive(img cri.Image, targets map[string]string) []Image {
	var order []string
	acc := map[string]*Image{}
	add := func(d string) *Image {
		e, ok := acc[d]
		if !ok {
			e = &Image{Digest: d, ImageID: img.ID}
			acc[d] = e
			order = append(order, d)
		}
		return e
	}
	for _, rd := range img.RepoDigests {
		repo, d, ok := strings.Cut(rd, "@")
		if !ok || d == "" {
			continue
		}
		e := add(d)
		e.Repos = append(e.Repos, repo)
	}
	if len(order) == 0 {
		// No repo digest: an image in the middle of its pull (CRI adds the
		// repo@digest name last) or one imported with `ctr import`. Key it
		// on the manifest its containerd records target, the digest that a
		// signature names; the image ID (a config digest, which nothing
		// signs) only when containerd has no record of it.
		d := targets[img.ID]
		for _, t := range img.RepoTags {
			if d == "" {
				d = targets[t]
			}
		}
		if d == "" {
			d = img.ID
		}
		e := add(d)
		for _, t := range img.RepoTags {
			if td, ok := targets[t]; ok && td != d {
				continue // the tag has moved on; its own image will claim it
			}
			e.Tags = append(e.Tags, t)
			e.Repos = append(e.Repos, repoOf(t))
		}
	} else {
		single := len(order) == 1
		first := order[0]
		for _, t := range img.RepoTags {
			d, ok := targets[t]
			switch {
			case ok && acc[d] != nil:
			case !ok && single:
				// No containerd record seen yet: the only digest is the
				// answer. A record that targets another digest wins over
				// a CRI view that may lag behind it.
				d = first
			default:
				continue
			}
			e := add(d)
			e.Tags = append(e.Tags, t)
			e.Repos = append(e.Repos, repoOf(t))
		}
	}
	out := make([]Image, 0, len(order))
	for _, d := range order {
		e := acc[d]
		slices.Sort(e.Repos)
		e.Repos = slices.Compact(e.Repos)
		slices.Sort(e.Tags)
		e.Tags = slices.Compact(e.Tags)
		out = append(out, *e)
	}
	return out
}

// repoOf returns the repository of "repo:tag".
func repoOf(tag string) string {
	i := strings.LastIndexByte(tag, ':')
	if i < 0 || strings.ContainsRune(tag[i:], '/') {
		return tag
	}
	return tag[:i]
}

// sameImage reports whether two entries are the same to the loop. The size
// and the GC-pin label are not in an entry: a pin label added by prefetch
// must not re-judge the digest.
func sameImage(a, b Image) bool {
	return a.Digest == b.Digest && a.ImageID == b.ImageID &&
		slices.Equal(a.Repos, b.Repos) && slices.Equal(a.Tags, b.Tags)
}

// joinContainers attributes each running container to digests: the digest
// CRI reports or the spec names when the node has it; else, through the
// image ID, the digest the spec's tag points at, or every digest of that
// image when the tag does not settle it (a running container is never lost).
func (st *state) joinContainers() map[string][]ContainerRef {
	out := make(map[string][]ContainerRef, len(st.containers))
	for _, c := range st.containers {
		ref := ContainerRef{ID: c.ID, Name: c.Name, Image: c.Image, PodNamespace: c.PodNamespace, PodName: c.PodName}
		for _, d := range st.containerDigests(c) {
			out[d] = append(out[d], ref)
		}
	}
	for d := range out {
		slices.SortFunc(out[d], func(a, b ContainerRef) int { return strings.Compare(a.ID, b.ID) })
	}
	return out
}

func (st *state) containerDigests(c cri.Container) []string {
	specDigest, specTag := "", ""
	if n, err := reference.ParseNormalizedNamed(c.Image); err == nil {
		if dg, ok := n.(reference.Digested); ok {
			specDigest = dg.Digest().String()
		} else {
			specTag = reference.TagNameOnly(n).String()
		}
	} else if strings.HasPrefix(c.Image, "sha256:") {
		specDigest = c.Image
	}
	if _, ok := st.entries[c.ImageRef]; ok && c.ImageRef != c.ImageID {
		return []string{c.ImageRef}
	}
	if _, d, ok := strings.Cut(c.ImageRef, "@"); ok {
		if _, ok := st.entries[d]; ok {
			return []string{d}
		}
	}
	if _, ok := st.entries[specDigest]; ok && specDigest != "" {
		return []string{specDigest}
	}
	id := c.ImageID
	if id == "" {
		id = c.ImageRef
	}
	if ds := st.idDigests[id]; len(ds) > 0 {
		if len(ds) == 1 {
			return ds
		}
		if d, ok := st.byTag[specTag]; ok && slices.Contains(ds, d) {
			return []string{d}
		}
		return slices.Clone(ds)
	}
	if d, ok := st.byTag[specTag]; ok {
		return []string{d}
	}
	return nil
}

// diffContainers returns the digests whose container list differs.
func diffContainers(a, b map[string][]ContainerRef) []string {
	var out []string
	for d, x := range a {
		if !slices.Equal(x, b[d]) {
			out = append(out, d)
		}
	}
	for d := range b {
		if _, ok := a[d]; !ok {
			out = append(out, d)
		}
	}
	return out
}

// diffEntries returns the digests whose entry differs between a and b.
func diffEntries(a, b map[string]Image) []string {
	var out []string
	for d, x := range a {
		if y, ok := b[d]; !ok || !sameImage(x, y) {
			out = append(out, d)
		}
	}
	for d := range b {
		if _, ok := a[d]; !ok {
			out = append(out, d)
		}
	}
	return out
}
