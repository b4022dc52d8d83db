// Package cri is pinwarden's adapter to the container runtime: the CRI image
// and runtime services plus containerd's own image store and event stream, all
// over the one socket, exposed as plain Go types.
//
// CRI alone cannot tell which of an image's repo digests a tag points at, and
// containerd events carry only an image name; this package gives both views
// (ListImages/ImageStatus from CRI, ImageTargets/ImageTarget/Events from
// containerd) and leaves joining them to the caller (agent/inventory).
//
// The gRPC connection is lazy and reconnects by itself: Dial does not need
// the runtime to be up, and calls made while it is down fail with an error
// matching ErrUnavailable.
package cri

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	eventsapi "github.com/containerd/containerd/api/events"
	eventsvc "github.com/containerd/containerd/api/services/events/v1"
	imagesvc "github.com/containerd/containerd/api/services/images/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	internalapi "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Sentinels that errors of this package match with errors.Is.
var (
	// ErrNotFound: the image (or name) does not exist in the runtime.
	ErrNotFound = errors.New("not found")
	// ErrUnavailable: the runtime cannot be reached right now, or did not
	// answer in time.
	ErrUnavailable = errors.New("runtime unavailable")
)

// Image topics of containerd's event stream.
const (
	TopicImageCreate = "/images/create"
	TopicImageUpdate = "/images/update"
	TopicImageDelete = "/images/delete"
)

// CRI labels kubelet puts on every container.
const (
	LabelPodNamespace  = "io.kubernetes.pod.namespace"
	LabelPodName       = "io.kubernetes.pod.name"
	LabelContainerName = "io.kubernetes.container.name"
)

// The containerd image label that containerd's CRI plugin turns into the CRI
// Image.pinned field; kubelet's image garbage collection never removes a
// pinned image.
const (
	LabelPinned      = "io.cri-containerd.pinned"
	LabelPinnedValue = "pinned"
)

// maxMsgSize bounds gRPC responses; a list of 10,000 images is a few MB.
const maxMsgSize = 64 << 20

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

// Container is one running container as CRI reports it.
type Container struct {
	ID   string
	Name string
	// Image is the reference in the container spec ("nginx:1.27", "repo@sha256:...").
	Image string
	// ImageRef is what CRI reports as the image: a digest or the image ID.
	ImageRef string
	// ImageID is the image ID (config digest) when the runtime reports one.
	ImageID      string
	PodNamespace string
	PodName      string
}

// Event is one image event from containerd. containerd events carry only the
// image name, never a digest.
type Event struct {
	Topic string // TopicImageCreate, TopicImageUpdate or TopicImageDelete
	Name  string // the containerd image name: "repo:tag", "repo@sha256:..." or "sha256:<id>"
}

// containerLister is the part of the CRI runtime service this package uses.
type containerLister interface {
	ListContainers(ctx context.Context, filter *runtimeapi.ContainerFilter) ([]*runtimeapi.Container, error)
}

// Client talks to one containerd over its socket. It is safe for concurrent
// use; all fields are set by Dial and never change.
type Client struct {
	conn       *grpc.ClientConn
	images     runtimeapi.ImageServiceClient
	containers containerLister
	ctdImages  imagesvc.ImagesClient
	ctdEvents  eventsvc.EventsClient
	namespace  string
	timeout    time.Duration
}

// Option configures Dial.
type Option func(*options)

type options struct {
	runtime internalapi.RuntimeService
	timeout time.Duration
}

// WithRuntimeService makes ListContainers use rs instead of the CRI runtime
// service on the socket (tests use k8s.io/cri-api/pkg/apis/testing's fake,
// since pod sandboxes cannot start everywhere).
func WithRuntimeService(rs internalapi.RuntimeService) Option {
	return func(o *options) { o.runtime = rs }
}

// WithTimeout bounds each call other than PullImage (default 2 minutes).
// PullImage is bounded only by its context.
func WithTimeout(d time.Duration) Option {
	return func(o *options) { o.timeout = d }
}

// Dial prepares a client for the runtime at endpoint ("unix:///run/containerd/containerd.sock"
// or a bare path) and containerd namespace (CRI uses "k8s.io"). It does not
// wait for the runtime: the connection is made on first use and remade after
// the runtime restarts.
func Dial(ctx context.Context, endpoint, namespace string, opts ...Option) (*Client, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	o := options{timeout: 2 * time.Minute}
	for _, opt := range opts {
		opt(&o)
	}
	path, err := socketPath(endpoint)
	if err != nil {
		return nil, err
	}
	if namespace == "" {
		return nil, errors.New("dial runtime: empty containerd namespace")
	}
	// Redialling a local socket is cheap; a short cap lets the caller's own
	// (jittered, capped) backoff decide when to come back, not gRPC's.
	bo := backoff.DefaultConfig
	bo.BaseDelay = 100 * time.Millisecond
	bo.MaxDelay = time.Second
	conn, err := grpc.NewClient("unix://"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithAuthority("localhost"),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: 5 * time.Second}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsgSize)),
	)
	if err != nil {
		return nil, fmt.Errorf("dial runtime %s: %w", endpoint, err)
	}
	c := &Client{
		conn:      conn,
		images:    runtimeapi.NewImageServiceClient(conn),
		ctdImages: imagesvc.NewImagesClient(conn),
		ctdEvents: eventsvc.NewEventsClient(conn),
		namespace: namespace,
		timeout:   o.timeout,
	}
	if o.runtime != nil {
		c.containers = o.runtime
	} else {
		c.containers = grpcRuntime{runtimeapi.NewRuntimeServiceClient(conn)}
	}
	return c, nil
}

func socketPath(endpoint string) (string, error) {
	switch {
	case strings.HasPrefix(endpoint, "unix://"):
		p := strings.TrimPrefix(endpoint, "unix://")
		if p == "" {
			return "", fmt.Errorf("dial runtime: empty socket path in %q", endpoint)
		}
		return p, nil
	case strings.HasPrefix(endpoint, "/"):
		return endpoint, nil
	default:
		return "", fmt.Errorf("dial runtime: endpoint %q is not a unix socket", endpoint)
	}
}

// Close closes the connection.
func (c *Client) Close() error {
	if err := c.conn.Close(); err != nil {
		return fmt.Errorf("close runtime connection: %w", err)
	}
	return nil
}

// Ping checks that the CRI image service answers.
func (c *Client) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if _, err := c.images.ImageFsInfo(ctx, &runtimeapi.ImageFsInfoRequest{}); err != nil {
		return fmt.Errorf("ping runtime: %w", mapErr(err))
	}
	return nil
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

// ListContainers lists running containers.
func (c *Client) ListContainers(ctx context.Context) ([]Container, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	list, err := c.containers.ListContainers(ctx, &runtimeapi.ContainerFilter{
		State: &runtimeapi.ContainerStateValue{State: runtimeapi.ContainerState_CONTAINER_RUNNING},
	})
	if err != nil {
		return nil, fmt.Errorf("list containers: %w", mapErr(err))
	}
	out := make([]Container, 0, len(list))
	for _, ct := range list {
		if ct.GetState() != runtimeapi.ContainerState_CONTAINER_RUNNING {
			continue // a runtime that ignores the filter
		}
		labels := ct.GetLabels()
		name := ct.GetMetadata().GetName()
		if name == "" {
			name = labels[LabelContainerName]
		}
		id := ct.GetImageId()
		if id == "" && isDigest(ct.GetImageRef()) {
			id = ct.GetImageRef()
		}
		out = append(out, Container{
			ID:           ct.GetId(),
			Name:         name,
			Image:        ct.GetImage().GetImage(),
			ImageRef:     ct.GetImageRef(),
			ImageID:      id,
			PodNamespace: labels[LabelPodNamespace],
			PodName:      labels[LabelPodName],
		})
	}
	return out, nil
}

func (c *Client) nsContext(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "containerd-namespace", c.namespace)
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

// Events subscribes to the image events of the namespace. The subscription
// is open when Events returns, so a list made afterwards misses nothing. The
// event channel is never closed; the error channel receives exactly one
// error when the stream ends (ctx.Err() after cancellation), after which no
// more events are sent.
func (c *Client) Events(ctx context.Context) (<-chan Event, <-chan error) {
	evc := make(chan Event, 64)
	errc := make(chan error, 1)
	ns := strconv.Quote(c.namespace)
	req := &eventsvc.SubscribeRequest{Filters: []string{
		`topic=="` + TopicImageCreate + `",namespace==` + ns,
		`topic=="` + TopicImageUpdate + `",namespace==` + ns,
		`topic=="` + TopicImageDelete + `",namespace==` + ns,
	}}
	stream, err := c.ctdEvents.Subscribe(ctx, req)
	if err != nil {
		errc <- fmt.Errorf("subscribe to events: %w", mapErr(err))
		return evc, errc
	}
	go func() {
		for {
			env, err := stream.Recv()
			if err != nil {
				if ctx.Err() != nil {
					err = ctx.Err()
				} else {
					err = fmt.Errorf("event stream: %w", mapErr(err))
				}
				errc <- err
				return
			}
			if env.GetNamespace() != c.namespace {
				continue
			}
			name, ok := eventName(env.GetTopic(), env.GetEvent().GetValue())
			if !ok {
				continue
			}
			select {
			case evc <- Event{Topic: env.GetTopic(), Name: name}:
			case <-ctx.Done():
				errc <- ctx.Err()
				return
			}
		}
	}()
	return evc, errc
}

// eventName decodes the image name of an image event payload.
func eventName(topic string, payload []byte) (string, bool) {
	var msg interface {
		proto.Message
		GetName() string
	}
	switch topic {
	case TopicImageCreate:
		msg = &eventsapi.ImageCreate{}
	case TopicImageUpdate:
		msg = &eventsapi.ImageUpdate{}
	case TopicImageDelete:
		msg = &eventsapi.ImageDelete{}
	default:
		return "", false
	}
	if err := proto.Unmarshal(payload, msg); err != nil || msg.GetName() == "" {
		return "", false
	}
	return msg.GetName(), true
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

// mappedErr keeps the gRPC error's text and chain and adds a sentinel.
type mappedErr struct {
	sentinel error
	err      error
}

func (e *mappedErr) Error() string   { return e.err.Error() }
func (e *mappedErr) Unwrap() []error { return []error{e.sentinel, e.err} }

// mapErr maps gRPC codes onto this package's sentinels.
func mapErr(err error) error {
	switch status.Code(err) {
	case codes.NotFound:
		return &mappedErr{ErrNotFound, err}
	case codes.Unavailable, codes.DeadlineExceeded:
		return &mappedErr{ErrUnavailable, err}
	}
	return err
}

// grpcRuntime adapts the generated CRI runtime client to containerLister.
type grpcRuntime struct {
	c runtimeapi.RuntimeServiceClient
}

func (g grpcRuntime) ListContainers(ctx context.Context, filter *runtimeapi.ContainerFilter) ([]*runtimeapi.Container, error) {
	resp, err := g.c.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: filter})
	if err != nil {
		return nil, err //nolint:wrapcheck // wrapped by the caller
	}
	return resp.GetContainers(), nil
}
