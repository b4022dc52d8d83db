// Command demotool does the few things `make demo` needs besides pinwarden
// and a containerd, with the libraries already in go.mod instead of the
// cosign, crane, crictl, curl and python CLIs: generate cosign key pairs,
// push small images, sign them the way `cosign sign --key` does, pull and
// list images through CRI, wait for and read HTTP endpoints, pick free ports.
//
//	demotool freeport
//	demotool keygen PREFIX                 writes PREFIX.key and PREFIX.pub
//	demotool image REPO:TAG CONTENT        pushes a one-file linux/amd64 image, prints its digest
//	demotool sign PREFIX.key REPO@DIGEST   cosign signature (.sig, no tlog)
//	demotool wait-cri ENDPOINT SECONDS     waits until the CRI image service answers
//	demotool pull ENDPOINT REF...          CRI PullImage
//	demotool images ENDPOINT               CRI ListImages: repo tags and digests
//	demotool wait-http URL SECONDS         waits until URL answers 200
//	demotool get URL                       prints the body of URL (fails unless 200)
//
// Registries are reached over plain HTTP. It exits 1 with a message on any
// error.
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"github.com/sigstore/sigstore/pkg/signature"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/pinwarden/pinwarden/test/harness"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout)
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "demotool: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("usage: demotool COMMAND ARGS... (see the package comment)")
	}
	cmd, args := args[0], args[1:]
	need := func(n int) error {
		if len(args) < n {
			return fmt.Errorf("%s needs %d arguments, got %d", cmd, n, len(args))
		}
		return nil
	}
	switch cmd {
	case "freeport":
		return freePort(out)
	case "keygen":
		if err := need(1); err != nil {
			return err
		}
		return keygen(args[0])
	case "image":
		if err := need(2); err != nil {
			return err
		}
		return pushImage(ctx, out, args[0], args[1])
	case "sign":
		if err := need(2); err != nil {
			return err
		}
		return sign(ctx, args[0], args[1])
	case "wait-cri":
		if err := need(2); err != nil {
			return err
		}
		return withTimeout(ctx, args[1], func(ctx context.Context) error { return waitCRI(ctx, args[0]) })
	case "pull":
		if err := need(2); err != nil {
			return err
		}
		return pull(ctx, args[0], args[1:])
	case "images":
		if err := need(1); err != nil {
			return err
		}
		return listImages(ctx, out, args[0])
	case "wait-http":
		if err := need(2); err != nil {
			return err
		}
		return withTimeout(ctx, args[1], func(ctx context.Context) error { return waitHTTP(ctx, args[0]) })
	case "get":
		if err := need(1); err != nil {
			return err
		}
		b, err := get(ctx, args[0])
		if err != nil {
			return err
		}
		_, err = out.Write(b)
		return err
	default:
		return fmt.Errorf("unknown command %q", cmd)
	}
}

func withTimeout(ctx context.Context, seconds string, f func(context.Context) error) error {
	s, err := strconv.Atoi(seconds)
	if err != nil {
		return fmt.Errorf("timeout %q: %w", seconds, err)
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(s)*time.Second)
	defer cancel()
	return f(ctx)
}

func freePort(out io.Writer) error {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	_, err = fmt.Fprintln(out, l.Addr().(*net.TCPAddr).Port)
	return err
}

// keygen writes an ECDSA P-256 key pair as PEM: PREFIX.key (PKCS#8,
// unencrypted: a demo key) and PREFIX.pub, the form pinwarden's keys: take.
func keygen(prefix string) error {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate key: %w", err)
	}
	privPEM, err := cryptoutils.MarshalPrivateKeyToPEM(priv)
	if err != nil {
		return fmt.Errorf("private key: %w", err)
	}
	pubPEM, err := cryptoutils.MarshalPublicKeyToPEM(priv.Public())
	if err != nil {
		return fmt.Errorf("public key: %w", err)
	}
	if err := os.WriteFile(prefix+".key", privPEM, 0o600); err != nil {
		return err
	}
	return os.WriteFile(prefix+".pub", pubPEM, 0o644)
}

// pushImage pushes a linux/amd64 image whose one layer holds hello.txt with
// content, and prints its manifest digest.
func pushImage(ctx context.Context, out io.Writer, ref, content string) error {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return fmt.Errorf("parse %q: %w", ref, err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	body := []byte(content + "\n")
	if err := tw.WriteHeader(&tar.Header{Name: "hello.txt", Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if _, err := tw.Write(body); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		return fmt.Errorf("layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	// containerd checks a single-manifest image's platform against its own.
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: "amd64",
		RootFS: v1.RootFS{Type: "layers", DiffIDs: diffIDs(img)}})
	if err != nil {
		return fmt.Errorf("image config: %w", err)
	}
	if err := remote.Write(r, img, remote.WithContext(ctx)); err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		return fmt.Errorf("digest: %w", err)
	}
	_, err = fmt.Fprintln(out, d)
	return err
}

func diffIDs(img v1.Image) []v1.Hash {
	cf, err := img.ConfigFile()
	if err != nil || cf == nil {
		return nil
	}
	return cf.RootFS.DiffIDs
}

// sign signs repo@digest with the private key at keyPath (see keygen).
func sign(ctx context.Context, keyPath, ref string) error {
	pemBytes, err := os.ReadFile(keyPath)
	if err != nil {
		return err
	}
	priv, err := cryptoutils.UnmarshalPEMToPrivateKey(pemBytes, cryptoutils.SkipPassword)
	if err != nil {
		return fmt.Errorf("key %s: %w", keyPath, err)
	}
	sv, err := signature.LoadSigner(priv, crypto.SHA256)
	if err != nil {
		return fmt.Errorf("signer: %w", err)
	}
	d, err := name.NewDigest(ref, name.Insecure)
	if err != nil {
		return fmt.Errorf("parse %q: %w", ref, err)
	}
	return harness.SignDigest(ctx, sv, d)
}

func criImages(endpoint string) (runtimeapi.ImageServiceClient, func(), error) {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, fmt.Errorf("CRI %s: %w", endpoint, err)
	}
	return runtimeapi.NewImageServiceClient(conn), func() { _ = conn.Close() }, nil
}

func waitCRI(ctx context.Context, endpoint string) error {
	images, closeConn, err := criImages(endpoint)
	if err != nil {
		return err
	}
	defer closeConn()
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := images.ImageFsInfo(cctx, &runtimeapi.ImageFsInfoRequest{})
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("CRI on %s not ready: %w (last error: %v)", endpoint, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func pull(ctx context.Context, endpoint string, refs []string) error {
	images, closeConn, err := criImages(endpoint)
	if err != nil {
		return err
	}
	defer closeConn()
	for _, ref := range refs {
		if _, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
			return fmt.Errorf("pull %s: %w", ref, err)
		}
	}
	return nil
}

// listImages prints what `crictl images --digests` prints: one row per
// repository tag (or digest only), with the image's manifest digest.
func listImages(ctx context.Context, out io.Writer, endpoint string) error {
	images, closeConn, err := criImages(endpoint)
	if err != nil {
		return err
	}
	defer closeConn()
	resp, err := images.ListImages(ctx, &runtimeapi.ListImagesRequest{})
	if err != nil {
		return fmt.Errorf("list images: %w", err)
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tTAG\tDIGEST\tIMAGE ID")
	for _, im := range resp.GetImages() {
		digest := "<none>"
		if len(im.GetRepoDigests()) > 0 {
			_, d, _ := strings.Cut(im.GetRepoDigests()[0], "@")
			digest = short(d)
		}
		id := short(im.GetId())
		tags := im.GetRepoTags()
		if len(tags) == 0 {
			for _, rd := range im.GetRepoDigests() {
				repo, _, _ := strings.Cut(rd, "@")
				fmt.Fprintf(tw, "%s\t<none>\t%s\t%s\n", repo, digest, id)
			}
			continue
		}
		for _, t := range tags {
			i := strings.LastIndexByte(t, ':')
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t[:i], t[i+1:], digest, id)
		}
	}
	return tw.Flush()
}

func short(d string) string {
	d = strings.TrimPrefix(d, "sha256:")
	if len(d) > 13 {
		return d[:13]
	}
	return d
}

func waitHTTP(ctx context.Context, url string) error {
	for {
		_, err := get(ctx, url)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w (last error: %v)", url, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func get(ctx context.Context, url string) ([]byte, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(cctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return b, nil
}
