// Package image builds pinwarden's OCI image without a Docker engine: one
// layer with the static binary, the CA certificates and a passwd/group that
// name the non-root user, on no base image, written with
// go-containerregistry. The build is reproducible: every timestamp is fixed,
// so the same binary gives the same digest.
package image

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Paths and user inside the image.
const (
	BinaryPath = "/pinwarden"
	CAPath     = "/etc/ssl/certs/ca-certificates.crt"
	// User is distroless' "nonroot". The DaemonSet overrides it with uid 0
	// where containerd's socket is root-only (docs/kubernetes.md).
	User = "65532:65532"
)

// epoch is every timestamp in the image: reproducible builds.
var epoch = time.Unix(0, 0).UTC()

// Options describe one image.
type Options struct {
	Binary  []byte // the static linux binary of cmd/pinwarden
	CACerts []byte // a PEM bundle of CA certificates
	Version string
	Commit  string
	Arch    string // GOARCH of Binary
	RefName string // org.opencontainers.image.ref.name in the layout's index, e.g. ghcr.io/pinwarden/pinwarden:v1.0.0
}

// Build returns the image.
func Build(o Options) (v1.Image, error) {
	if len(o.Binary) == 0 || len(o.CACerts) == 0 {
		return nil, fmt.Errorf("image needs the binary and the CA certificates")
	}
	if o.Arch == "" {
		return nil, fmt.Errorf("image needs the binary's architecture")
	}
	layerTar, err := rootfs(o)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{Layer: layer, History: v1.History{
		Created: v1.Time{Time: epoch}, CreatedBy: "pinwarden make image", Comment: "static binary, CA certificates, passwd",
	}})
	if err != nil {
		return nil, fmt.Errorf("append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", o.Arch
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = []string{BinaryPath}
	cf.Config.Cmd = []string{"agent", "--config", "/etc/pinwarden/config.yaml"}
	cf.Config.User = User
	cf.Config.WorkingDir = "/"
	cf.Config.Env = []string{"PATH=/", "SSL_CERT_FILE=" + CAPath}
	cf.Config.Labels = map[string]string{
		"org.opencontainers.image.title":    "pinwarden",
		"org.opencontainers.image.source":   "https://github.com/pinwarden/pinwarden",
		"org.opencontainers.image.version":  o.Version,
		"org.opencontainers.image.revision": o.Commit,
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("set config: %w", err)
	}
	return img, nil
}

// WriteLayout writes img as the only image of a fresh OCI layout at dir.
func WriteLayout(dir string, img v1.Image, refName string) error {
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("clear %s: %w", dir, err)
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("layout %s: %w", dir, err)
	}
	var opts []layout.Option
	if refName != "" {
		opts = append(opts, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": refName}))
	}
	if err := p.AppendImage(img, opts...); err != nil {
		return fmt.Errorf("write image to %s: %w", dir, err)
	}
	return nil
}

// rootfs is the image's one layer: directories, the binary, the CA bundle,
// and /etc/passwd and /etc/group naming root and nonroot.
func rootfs(o Options) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := func(name string, mode int64) error {
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: epoch, Format: tar.FormatPAX})
	}
	file := func(name string, mode int64, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(b)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	steps := []func() error{
		func() error { return dir("etc/", 0o755) },
		func() error { return dir("etc/ssl/", 0o755) },
		func() error { return dir("etc/ssl/certs/", 0o755) },
		func() error { return dir("tmp/", 0o1777) },
		func() error {
			return file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"))
		},
		func() error { return file("etc/group", 0o644, []byte("root:x:0:\nnonroot:x:65532:\n")) },
		func() error { return file(CAPath[1:], 0o644, o.CACerts) },
		func() error { return file(BinaryPath[1:], 0o755, o.Binary) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return nil, fmt.Errorf("image layer: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("image layer: %w", err)
	}
	return buf.Bytes(), nil
}
