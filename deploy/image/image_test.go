package image

import (
	"bytes"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/pinwarden/pinwarden/test/harness"
)

// binary builds cmd/pinwarden the way `make image` does: static, with
// version and commit stamped in.
func binary(t *testing.T, version, commit string) []byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pinwarden")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version="+version+" -X main.commit="+commit,
		"-o", path, "./cmd/pinwarden")
	// In the agent's own module, with its go.mod (deploy's raises some
	// shared dependencies), as `make image` builds it.
	cmd.Dir = filepath.Join("..", "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func caCerts(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile("/etc/ssl/certs/ca-certificates.crt")
	if err != nil {
		t.Fatalf("CA bundle (Debian's ca-certificates): %v", err)
	}
	return b
}

// buildLayout builds the image of a binary stamped with version and commit
// and writes it to an OCI layout; it returns the options, the layout's
// directory and the image's digest.
func buildLayout(t *testing.T, version, commit string) (Options, string, v1.Hash) {
	t.Helper()
	opts := Options{Binary: binary(t, version, commit), CACerts: caCerts(t), Version: version, Commit: commit,
		Arch: runtime.GOARCH, RefName: "ghcr.io/pinwarden/pinwarden:" + version}
	img, err := Build(opts)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "layout")
	if err := WriteLayout(dir, img, opts.RefName); err != nil {
		t.Fatal(err)
	}
	want, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return opts, dir, want
}

// TestImage builds the image into an OCI layout, reads it back, checks its
// config and files, and runs `pinwarden version` from its unpacked root
// filesystem.
func TestImage(t *testing.T) {
	harness.SkipShort(t, "builds the binary and the image")
	const version, commit = "v9.8.7-test", "abc1234"
	opts, dir, want := buildLayout(t, version, commit)

	// Reproducible: the same inputs give the same digest.
	again, err := Build(opts)
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := again.Digest(); d != want {
		t.Errorf("second build digest %s != %s", d, want)
	}

	// Read back from the layout.
	p, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Digest != want || im.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != opts.RefName {
		t.Fatalf("layout index %+v, want one manifest %s named %s", im.Manifests, want, opts.RefName)
	}
	got, err := p.Image(want)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := got.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	c := cf.Config
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH || c.User != User || strings.Join(c.Entrypoint, " ") != BinaryPath ||
		c.Labels["org.opencontainers.image.version"] != version || c.Labels["org.opencontainers.image.revision"] != commit {
		t.Errorf("config = os %s arch %s user %q entrypoint %v labels %v", cf.OS, cf.Architecture, c.User, c.Entrypoint, c.Labels)
	}
	if mt, _ := got.MediaType(); mt != "application/vnd.oci.image.manifest.v1+json" {
		t.Errorf("media type %s", mt)
	}

	// Unpack the root filesystem the way a runtime would and run the binary.
	root := unpack(t, got)
	for _, f := range []string{"etc/passwd", "etc/group", CAPath[1:]} {
		if _, err := os.Stat(filepath.Join(root, f)); err != nil {
			t.Errorf("image lacks /%s: %v", f, err)
		}
	}
	ef, err := elf.Open(filepath.Join(root, BinaryPath))
	if err != nil {
		t.Fatal(err)
	}
	for _, prog := range ef.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Error("the binary is dynamically linked (has an ELF interpreter)")
		}
	}
	ef.Close()
	out, err := exec.Command(filepath.Join(root, BinaryPath), "version").CombinedOutput()
	if err != nil {
		t.Fatalf("pinwarden version from the image: %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte(version)) || !bytes.Contains(out, []byte(commit)) {
		t.Errorf("pinwarden version = %q, want %s and %s", out, version, commit)
	}
}

// unpack extracts img's flattened filesystem into a temp dir.
func unpack(t *testing.T, img v1.Image) string {
	t.Helper()
	root := t.TempDir()
	rc := mutate.Extract(img)
	defer rc.Close()
	cmd := exec.Command("tar", "-x", "-C", root)
	cmd.Stdin = rc
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("untar: %v\n%s", err, out)
	}
	return root
}
