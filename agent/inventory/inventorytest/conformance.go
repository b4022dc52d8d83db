package inventorytest

import (
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/cri"
)

// Backend is one runtime under the conformance suite.
type Backend struct {
	Runtime inventory.Runtime
	// Repo is the repository prefix images are published under
	// ("127.0.0.1:5000/conformance").
	Repo string
	// Publish makes a new image available as ref (a new digest on every
	// call) and pulls it through the runtime; it returns the manifest
	// digest and the image ID.
	Publish func(t testing.TB, ref string) (digest, id string)
	// Remove removes the image ref names, like CRI RemoveImage.
	Remove func(t testing.TB, ref string)
	// Untag deletes one containerd image name record, like
	// `ctr -n k8s.io images rm NAME`.
	Untag func(t testing.TB, name string)
}

// FakeBackend returns a Backend over a new Fake.
func FakeBackend(t testing.TB) (Backend, *Fake) {
	f := NewFake()
	var n atomic.Int64
	return Backend{
		Runtime: f,
		Repo:    "registry.test:5000/conformance",
		Publish: func(_ testing.TB, ref string) (string, string) {
			i := n.Add(1)
			d, id := Digest(fmt.Sprintf("manifest %s %d", ref, i)), Digest(fmt.Sprintf("config %s %d", ref, i))
			f.Pull(ref, d, id, 1000)
			return d, id
		},
		Remove: func(_ testing.TB, ref string) { f.Remove(ref) },
		Untag:  func(_ testing.TB, name string) { f.Untag(name) },
	}, f
}

// RuntimeConformance checks the behaviour the inventory relies on. newBackend
// is called once per subtest.
func RuntimeConformance(t *testing.T, newBackend func(t *testing.T) Backend) {
	t.Run("pull creates tag, digest and ID names", func(t *testing.T) {
		b := newBackend(t)
		ctx := t.Context()
		ref := b.Repo + "/a:v1"
		digest, id := b.Publish(t, ref)
		repoDigest := b.Repo + "/a@" + digest

		list, err := b.Runtime.ListImages(ctx)
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(list, func(im cri.Image) bool { return im.ID == id })
		if i < 0 {
			t.Fatalf("image %s not listed: %+v", id, list)
		}
		if !slices.Equal(list[i].RepoTags, []string{ref}) || !slices.Equal(list[i].RepoDigests, []string{repoDigest}) {
			t.Errorf("listed %+v, want tags [%s] digests [%s]", list[i], ref, repoDigest)
		}
		for _, name := range []string{ref, repoDigest, id} {
			st, err := b.Runtime.ImageStatus(ctx, name)
			if err != nil || st == nil || st.ID != id {
				t.Errorf("ImageStatus(%s) = %+v, %v; want ID %s", name, st, err, id)
			}
			got, err := b.Runtime.ImageTarget(ctx, name)
			if err != nil || got != digest {
				t.Errorf("ImageTarget(%s) = %q, %v; want %s", name, got, err, digest)
			}
		}
		targets, err := b.Runtime.ImageTargets(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{ref, repoDigest, id} {
			if targets[name] != digest {
				t.Errorf("ImageTargets[%s] = %q, want %s", name, targets[name], digest)
			}
		}
	})

	t.Run("absent names", func(t *testing.T) {
		b := newBackend(t)
		ctx := t.Context()
		if st, err := b.Runtime.ImageStatus(ctx, b.Repo+"/none:v1"); st != nil || err != nil {
			t.Errorf("ImageStatus(absent) = %+v, %v; want nil, nil", st, err)
		}
		if _, err := b.Runtime.ImageTarget(ctx, b.Repo+"/none:v1"); !errors.Is(err, cri.ErrNotFound) {
			t.Errorf("ImageTarget(absent) = %v, want cri.ErrNotFound", err)
		}
	})

	t.Run("events name every created and deleted name", func(t *testing.T) {
		b := newBackend(t)
		ctx := t.Context()
		evc, errc := b.Runtime.Events(ctx)
		ref := b.Repo + "/ev:v1"
		digest, id := b.Publish(t, ref)
		repoDigest := b.Repo + "/ev@" + digest
		waitEvents(t, evc, errc, cri.TopicImageCreate, ref, repoDigest, id)
		b.Remove(t, id)
		waitEvents(t, evc, errc, cri.TopicImageDelete, ref, repoDigest, id)
	})

	t.Run("re-pull moves the tag", func(t *testing.T) {
		b := newBackend(t)
		ctx := t.Context()
		ref := b.Repo + "/mv:v1"
		d1, id1 := b.Publish(t, ref)
		d2, id2 := b.Publish(t, ref)
		if d1 == d2 || id1 == id2 {
			t.Fatalf("Publish must make a new image: %s/%s", d1, d2)
		}
		if got, err := b.Runtime.ImageTarget(ctx, ref); err != nil || got != d2 {
			t.Errorf("ImageTarget(tag) = %q, %v; want %s", got, err, d2)
		}
		old, err := b.Runtime.ImageStatus(ctx, id1)
		if err != nil || old == nil {
			t.Fatalf("old image gone: %+v, %v", old, err)
		}
		if len(old.RepoTags) != 0 || !slices.Equal(old.RepoDigests, []string{b.Repo + "/mv@" + d1}) {
			t.Errorf("old image = %+v, want no tag and its repo digest", old)
		}
		cur, err := b.Runtime.ImageStatus(ctx, ref)
		if err != nil || cur == nil || cur.ID != id2 {
			t.Errorf("ImageStatus(tag) = %+v, %v; want %s", cur, err, id2)
		}
	})

	t.Run("deleting the tag record keeps the image", func(t *testing.T) {
		b := newBackend(t)
		ctx := t.Context()
		evc, errc := b.Runtime.Events(ctx)
		ref := b.Repo + "/untag:v1"
		digest, id := b.Publish(t, ref)
		b.Untag(t, ref)
		waitEvents(t, evc, errc, cri.TopicImageDelete, ref)
		// CRI updates its cache from the same event: give it a moment.
		deadline := time.Now().Add(5 * time.Second)
		for {
			st, err := b.Runtime.ImageStatus(ctx, id)
			if err != nil || st == nil {
				t.Fatalf("image gone with its tag: %+v, %v", st, err)
			}
			if len(st.RepoTags) == 0 {
				if !slices.Equal(st.RepoDigests, []string{b.Repo + "/untag@" + digest}) {
					t.Errorf("repo digests = %v", st.RepoDigests)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("tag still listed: %+v", st)
			}
			time.Sleep(10 * time.Millisecond)
		}
		if st, err := b.Runtime.ImageStatus(ctx, ref); st != nil || err != nil {
			t.Errorf("ImageStatus(deleted tag) = %+v, %v", st, err)
		}
		// Deleting the repo digest too leaves the image under its ID.
		b.Untag(t, b.Repo+"/untag@"+digest)
		waitEvents(t, evc, errc, cri.TopicImageDelete, b.Repo+"/untag@"+digest)
		deadline = time.Now().Add(5 * time.Second)
		for {
			st, err := b.Runtime.ImageStatus(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if st != nil && len(st.RepoDigests) == 0 && len(st.RepoTags) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("image under its ID only: got %+v", st)
			}
			time.Sleep(10 * time.Millisecond)
		}
	})

	t.Run("remove by ID removes every name", func(t *testing.T) {
		b := newBackend(t)
		ctx := t.Context()
		ref := b.Repo + "/rm:v1"
		digest, id := b.Publish(t, ref)
		b.Remove(t, id)
		for _, name := range []string{ref, b.Repo + "/rm@" + digest, id} {
			if st, err := b.Runtime.ImageStatus(ctx, name); st != nil || err != nil {
				t.Errorf("ImageStatus(%s) after remove = %+v, %v", name, st, err)
			}
			if _, err := b.Runtime.ImageTarget(ctx, name); !errors.Is(err, cri.ErrNotFound) {
				t.Errorf("ImageTarget(%s) after remove = %v", name, err)
			}
		}
	})
}

func waitEvents(t *testing.T, evc <-chan cri.Event, errc <-chan error, topic string, names ...string) {
	t.Helper()
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	deadline := time.After(10 * time.Second)
	for len(want) > 0 {
		select {
		case ev := <-evc:
			if ev.Topic == topic {
				delete(want, ev.Name)
			}
		case err := <-errc:
			t.Fatalf("event stream ended: %v", err)
		case <-deadline:
			t.Fatalf("no %s event for %v", topic, want)
		}
	}
}
