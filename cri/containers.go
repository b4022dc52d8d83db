package cri

import (
	"context"
	"fmt"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// CRI labels kubelet puts on every container.
const (
	LabelPodNamespace  = "io.kubernetes.pod.namespace"
	LabelPodName       = "io.kubernetes.pod.name"
	LabelContainerName = "io.kubernetes.container.name"
)

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

// containerLister is the part of the CRI runtime service this package uses.
type containerLister interface {
	ListContainers(ctx context.Context, filter *runtimeapi.ContainerFilter) ([]*runtimeapi.Container, error)
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

// grpcRuntime adapts the generated CRI runtime client to containerLister.
type grpcRuntime struct {
	c runtimeapi.RuntimeServiceClient
}

func (g grpcRuntime) ListContainers(ctx context.Context, filter *runtimeapi.ContainerFilter) ([]*runtimeapi.Container, error) {
	resp, err := g.c.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: filter})
	if err != nil {
		return nil, err // wrapped by the caller
	}
	return resp.GetContainers(), nil
}
