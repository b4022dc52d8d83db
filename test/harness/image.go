package harness

import (
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// RandomImage builds a linux/amd64 image with one layer holding sizeBytes of
// random data. Every call returns a different image (and digest).
func RandomImage(t testing.TB, sizeBytes int) v1.Image {
	t.Helper()
	img, err := random.Image(int64(sizeBytes), 1)
	if err != nil {
		t.Fatalf("random image: %v", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatalf("random image config: %v", err)
	}
	cf = cf.DeepCopy()
	// containerd checks the platform of a single-manifest image against the
	// pull platform, so the config must say linux/amd64.
	cf.OS, cf.Architecture = "linux", "amd64"
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatalf("random image platform: %v", err)
	}
	return img
}

// PushImage pushes img to ref (plain HTTP is allowed) and returns the
// manifest digest "sha256:...".
func PushImage(t testing.TB, ref string, img v1.Image) string {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatalf("parse %q: %v", ref, err)
	}
	if err := remote.Write(r, img, remote.WithContext(t.Context())); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatalf("digest of %s: %v", ref, err)
	}
	return d.String()
}

// PushRandomImage builds a random linux/amd64 image of about sizeBytes (see
// RandomImage), pushes it to ref and returns its manifest digest.
func PushRandomImage(t testing.TB, ref string, sizeBytes int) string {
	t.Helper()
	return PushImage(t, ref, RandomImage(t, sizeBytes))
}

// ImageID returns the config digest of img, which is what CRI reports as the
// image ID.
func ImageID(t testing.TB, img v1.Image) string {
	t.Helper()
	h, err := img.ConfigName()
	if err != nil {
		t.Fatalf("config digest: %v", err)
	}
	return h.String()
}
