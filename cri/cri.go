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
//
// Files by job: cri.go the connection and errors; images.go the CRI image
// service and containerd's image store; containers.go the running containers
// (CRI runtime service); events.go containerd's event stream (images, tasks).
package cri

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	eventsvc "github.com/containerd/containerd/api/services/events/v1"
	imagesvc "github.com/containerd/containerd/api/services/images/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
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

// maxMsgSize bounds gRPC responses; a list of 10,000 images is a few MB.
const maxMsgSize = 64 << 20

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

func (c *Client) nsContext(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "containerd-namespace", c.namespace)
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
