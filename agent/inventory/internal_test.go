package inventory

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/cri"
)

// TestReconnectBackoff: reconnect waits start at the base, double up to
// the cap, and carry up to 10% jitter (and some jitter).
func TestReconnectBackoff(t *testing.T) {
	t.Parallel()
	inv := New(nil, nil, WithBackoff(200*time.Millisecond, 30*time.Second))
	want := []time.Duration{200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, 1600 * time.Millisecond,
		3200 * time.Millisecond, 6400 * time.Millisecond, 12800 * time.Millisecond, 25600 * time.Millisecond,
		30 * time.Second, 30 * time.Second, 30 * time.Second}
	seen := map[time.Duration]bool{}
	for range 50 {
		b := inv.reconnectBackoff()
		for i, w := range want {
			d := b.Step()
			if d < w || d > w+w/10 {
				t.Fatalf("wait %d = %v, want in [%v, %v]", i, d, w, w+w/10)
			}
			seen[d] = true
		}
	}
	if len(seen) < 100 {
		t.Errorf("only %d distinct waits in 550: no jitter", len(seen))
	}
}

func TestDerive(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		img     cri.Image
		targets map[string]string
		want    []Image
	}{
		{
			name:    "one digest, tag without record",
			img:     cri.Image{ID: "id", RepoTags: []string{"r:v1"}, RepoDigests: []string{"r@d1"}, Size: 5},
			targets: map[string]string{},
			want:    []Image{{Digest: "d1", ImageID: "id", Repos: []string{"r"}, Tags: []string{"r:v1"}, Size: 5}},
		},
		{
			name:    "one digest, tag record targets another digest",
			img:     cri.Image{ID: "id", RepoTags: []string{"r:v1"}, RepoDigests: []string{"r@d1"}},
			targets: map[string]string{"r:v1": "d2"},
			want:    []Image{{Digest: "d1", ImageID: "id", Repos: []string{"r"}}},
		},
		{
			name: "two digests, tags by record",
			img: cri.Image{ID: "id", RepoTags: []string{"a:v1", "b:v1", "b:v2"},
				RepoDigests: []string{"a@d1", "b@d2"}},
			targets: map[string]string{"a:v1": "d1", "b:v1": "d2", "b:v2": "d2"},
			want: []Image{
				{Digest: "d1", ImageID: "id", Repos: []string{"a"}, Tags: []string{"a:v1"}},
				{Digest: "d2", ImageID: "id", Repos: []string{"b"}, Tags: []string{"b:v1", "b:v2"}},
			},
		},
		{
			name:    "two digests, tag without record is not guessed",
			img:     cri.Image{ID: "id", RepoTags: []string{"a:v1"}, RepoDigests: []string{"a@d1", "b@d2"}},
			targets: map[string]string{},
			want: []Image{
				{Digest: "d1", ImageID: "id", Repos: []string{"a"}},
				{Digest: "d2", ImageID: "id", Repos: []string{"b"}},
			},
		},
		{
			name:    "same digest in two repos",
			img:     cri.Image{ID: "id", RepoTags: []string{"b:v1"}, RepoDigests: []string{"b@d1", "a@d1"}},
			targets: map[string]string{"b:v1": "d1"},
			want:    []Image{{Digest: "d1", ImageID: "id", Repos: []string{"a", "b"}, Tags: []string{"b:v1"}}},
		},
		{
			name:    "no repo digest, mid-pull: keys on the tag's target manifest",
			img:     cri.Image{ID: "id", RepoTags: []string{"host:5000/r:v1"}},
			targets: map[string]string{"host:5000/r:v1": "x"},
			want:    []Image{{Digest: "x", ImageID: "id", Repos: []string{"host:5000/r"}, Tags: []string{"host:5000/r:v1"}}},
		},
		{
			name:    "no repo digest: the ID record's manifest wins, a moved tag is left out",
			img:     cri.Image{ID: "id", RepoTags: []string{"host:5000/r:v1", "host:5000/r:v2"}},
			targets: map[string]string{"id": "x", "host:5000/r:v1": "x", "host:5000/r:v2": "y"},
			want:    []Image{{Digest: "x", ImageID: "id", Repos: []string{"host:5000/r"}, Tags: []string{"host:5000/r:v1"}}},
		},
		{
			name:    "no repo digest and no containerd record: keys on the ID",
			img:     cri.Image{ID: "id", RepoTags: []string{"host:5000/r:v1"}},
			targets: map[string]string{},
			want:    []Image{{Digest: "id", ImageID: "id", Repos: []string{"host:5000/r"}, Tags: []string{"host:5000/r:v1"}}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got := derive(tt.img, tt.targets)
			if !slices.EqualFunc(got, tt.want, sameImage) {
				t.Errorf("derive =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

func TestRepoOf(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"r:v1":                "r",
		"host:5000/r:v1":      "host:5000/r",
		"host:5000/r":         "host:5000/r",
		"docker.io/library/x": "docker.io/library/x",
	} {
		if got := repoOf(in); got != want {
			t.Errorf("repoOf(%q) = %q, want %q", in, got, want)
		}
	}
}

// BenchmarkBuildState10k guards the inventory's own share of a full relist
// of 10,000 images (two tags each) with 100 running containers: it must stay
// a few tens of milliseconds on a 2-core node.
func BenchmarkBuildState10k(b *testing.B) {
	images := make([]cri.Image, 0, 10000)
	targets := map[string]string{}
	var containers []cri.Container
	for i := range 10000 {
		id, dg := fmt.Sprintf("sha256:%064d", i), fmt.Sprintf("sha256:%063dd", i)
		repo := fmt.Sprintf("registry.example.com/team%d/app%d", i%50, i)
		im := cri.Image{ID: id, RepoTags: []string{repo + ":v1", repo + ":latest"}, RepoDigests: []string{repo + "@" + dg}, Size: 1 << 20}
		images = append(images, im)
		for _, n := range names(im) {
			targets[n] = dg
		}
		if i%100 == 0 {
			containers = append(containers, cri.Container{ID: fmt.Sprint("c", i), Image: repo + ":v1", ImageRef: id, ImageID: id})
		}
	}
	for b.Loop() {
		st := buildState(images, targets, containers)
		if len(st.entries) != 10000 {
			b.Fatal(len(st.entries))
		}
	}
}
