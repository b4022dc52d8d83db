// Command mkimage builds pinwarden's OCI image from a static binary into an
// OCI layout and prints its digest (`make image`).
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"

	"github.com/pinwarden/pinwarden/deploy/image"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	bin := fs.String("binary", "", "static linux binary of cmd/pinwarden")
	ca := fs.String("ca", "/etc/ssl/certs/ca-certificates.crt", "PEM bundle of CA certificates to ship")
	out := fs.String("out", "bin/image", "OCI layout directory to write (replaced)")
	version := fs.String("version", "dev", "version label")
	commit := fs.String("commit", "unknown", "commit label")
	arch := fs.String("arch", runtime.GOARCH, "GOARCH of the binary")
	repo := fs.String("repo", "ghcr.io/pinwarden/pinwarden", "repository the image is meant for (the layout's ref name)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	b, err := os.ReadFile(*bin)
	if err != nil {
		return fmt.Errorf("binary: %w", err)
	}
	certs, err := os.ReadFile(*ca)
	if err != nil {
		return fmt.Errorf("CA certificates: %w", err)
	}
	ref := *repo + ":" + *version
	img, err := image.Build(image.Options{Binary: b, CACerts: certs, Version: *version, Commit: *commit, Arch: *arch, RefName: ref})
	if err != nil {
		return err
	}
	if err := image.WriteLayout(*out, img, ref); err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return fmt.Errorf("digest: %w", err)
	}
	fmt.Fprintf(stdout, `%s
wrote %s (OCI layout, %s)
push it:            crane push %s %s
then pin it in deploy/kubernetes/base/kustomization.yaml (or an overlay):
  images: [{name: pinwarden, newName: %s, digest: %s}]
or: cd deploy/kubernetes/base && kustomize edit set image pinwarden=%s@%s
`, d, *out, ref, *out, ref, *repo, d, *repo, d)
	return nil
}
