package cri

import (
	"context"
	"errors"
	"fmt"
	"strings"

	imagesvc "github.com/containerd/containerd/api/services/images/v1"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The containerd image label that containerd's CRI plugin turns into the CRI
// Image.pinned field; kubelet's image garbage collection never removes a
// pinned image.
const (
	LabelPinned      = "io.cri-containerd.pinned"
	LabelPinnedValue = "pinned"
)

// Image is one CRI image: a config digest (ID) with every name it carries.
type Image struct {
	ID          string   // image ID, the config digest "sha256:..."
	RepoTags    []string // "repo:tag", normalized as containerd stores them
	RepoDigests []string // "repo@sha256:..."
	Size        uint64
	Pinned      bool
}

// Auth is the registry credential for one pull. It is passed to the runtime
// and never logged.
type Auth struct {
	Username      string
	Password      string
	IdentityToken string
	RegistryToken string
}

// ListImages lists every CRI image.
func (c *Client) ListImages(ctx context.Context) ([]Image, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.images.ListImages(ctx, &runtimeapi.ListImagesRequest{})
	if err != nil {
		return nil, fmt.Errorf("list images: %w", mapErr(err))
	}
	out := make([]Image, 0, len(resp.GetImages()))
	for _, im := range resp.GetImages() {
		out = append(out, fromCRIImage(im))
	}
	return out, nil
}

// ImageStatus returns the image ref names (tag, repo@digest or image ID), or
// nil and no error when the runtime has no such image.
func (c *Client) ImageStatus(ctx context.Context, ref string) (*Image, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		err = mapErr(err)
		if errors.Is(err, ErrNotFound) {
			return nil, nil
		}
		return nil, fmt.Errorf("image status %s: %w", ref, err)
	}
	if resp.GetImage() == nil {
		return nil, nil
	}
	im := fromCRIImage(resp.GetImage())
	return &im, nil
}

// PullImage pulls ref through CRI (so the runtime applies its registry
// configuration) and returns the image reference the runtime reports (the
// image ID for containerd).
func (c *Client) PullImage(ctx context.Context, ref string, auth *Auth) (string, error) {
	req := &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}
	if auth != nil {
		req.Auth = &runtimeapi.AuthConfig{
			Username:      auth.Username,
			Password:      auth.Password,
			IdentityToken: auth.IdentityToken,
			RegistryToken: auth.RegistryToken,
		}
	}
	resp, err := c.images.PullImage(ctx, req)
	if err != nil {
		return "", fmt.Errorf("pull %s: %w", ref, mapErr(err))
	}
	return resp.GetImageRef(), nil
}

// RemoveImage removes ref (a tag, repo@digest or image ID) through CRI.
// containerd removes the whole image with every name it carries.
func (c *Client) RemoveImage(ctx context.Context, ref string) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if _, err := c.images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
		return fmt.Errorf("remove image %s: %w", ref, mapErr(err))
	}
	return nil
}

// ImageTargets maps every containerd image name in the namespace to its
// target (manifest or index) digest, in one List call.
func (c *Client) ImageTargets(ctx context.Context) (map[string]string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.ctdImages.List(c.nsContext(ctx), &imagesvc.ListImagesRequest{})
	if err != nil {
		return nil, fmt.Errorf("list containerd images: %w", mapErr(err))
	}
	out := make(map[string]string, len(resp.GetImages()))
	for _, im := range resp.GetImages() {
		out[im.GetName()] = im.GetTarget().GetDigest()
	}
	return out, nil
}

// ImageTarget returns the target digest of one containerd image name, or an
// error matching ErrNotFound.
func (c *Client) ImageTarget(ctx context.Context, name string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.ctdImages.Get(c.nsContext(ctx), &imagesvc.GetImageRequest{Name: name})
	if err != nil {
		return "", fmt.Errorf("containerd image %s: %w", name, mapErr(err))
	}
	return resp.GetImage().GetTarget().GetDigest(), nil
}

// ImageLabels returns the labels of one containerd image name (e.g.
// "repo@sha256:..."), or an error matching ErrNotFound.
func (c *Client) ImageLabels(ctx context.Context, name string) (map[string]string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.ctdImages.Get(c.nsContext(ctx), &imagesvc.GetImageRequest{Name: name})
	if err != nil {
		return nil, fmt.Errorf("containerd image %s: %w", name, mapErr(err))
	}
	return resp.GetImage().GetLabels(), nil
}

// PinImage sets the label io.cri-containerd.pinned=pinned on the containerd
// image name (in the client's namespace) through the containerd images API,
// leaving its other labels alone. It is a no-op when the label is already
// set. An absent image is an error matching ErrNotFound.
func (c *Client) PinImage(ctx context.Context, name string) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	ctx = c.nsContext(ctx)
	resp, err := c.ctdImages.Get(ctx, &imagesvc.GetImageRequest{Name: name})
	if err != nil {
		return fmt.Errorf("pin image %s: %w", name, mapErr(err))
	}
	img := resp.GetImage()
	if img.GetLabels()[LabelPinned] == LabelPinnedValue {
		return nil
	}
	_, err = c.ctdImages.Update(ctx, &imagesvc.UpdateImageRequest{
		Image: &imagesvc.Image{
			Name:   name,
			Target: img.GetTarget(),
			Labels: map[string]string{LabelPinned: LabelPinnedValue},
		},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"labels." + LabelPinned}},
	})
	if err != nil {
		return fmt.Errorf("pin image %s: %w", name, mapErr(err))
	}
	return nil
}

func fromCRIImage(im *runtimeapi.Image) Image {
	return Image{
		ID:          im.GetId(),
		RepoTags:    append([]string(nil), im.GetRepoTags()...),
		RepoDigests: append([]string(nil), im.GetRepoDigests()...),
		Size:        im.GetSize(),
		Pinned:      im.GetPinned(),
	}
}

func isDigest(s string) bool {
	return strings.HasPrefix(s, "sha256:") && len(s) == len("sha256:")+64
}
