package cri

import (
	"context"
	"fmt"
	"strconv"

	eventsapi "github.com/containerd/containerd/api/events"
	eventsvc "github.com/containerd/containerd/api/services/events/v1"
	"google.golang.org/protobuf/proto"
)

// Image topics of containerd's event stream.
const (
	TopicImageCreate = "/images/create"
	TopicImageUpdate = "/images/update"
	TopicImageDelete = "/images/delete"
)

// Task and container topics: a container (or pod sandbox) started, exited or
// went away. Their events say which container, not its state as CRI reports
// it; the caller lists the containers again.
const (
	TopicTaskStart       = "/tasks/start"
	TopicTaskExit        = "/tasks/exit"
	TopicTaskDelete      = "/tasks/delete"
	TopicContainerCreate = "/containers/create"
	TopicContainerDelete = "/containers/delete"
)

var containerTopics = []string{TopicTaskStart, TopicTaskExit, TopicTaskDelete, TopicContainerCreate, TopicContainerDelete}

// Event is one image or container event from containerd. Image events carry
// only the image name, never a digest.
type Event struct {
	// Topic is one of the Topic* constants.
	Topic string
	// Name is the containerd image name of an image event ("repo:tag",
	// "repo@sha256:..." or "sha256:<id>"), the container ID of a task or
	// container event.
	Name string
}

// IsContainer reports whether e is a task or container event rather than an
// image event.
func (e Event) IsContainer() bool {
	for _, t := range containerTopics {
		if e.Topic == t {
			return true
		}
	}
	return false
}

// Events subscribes to the image, task and container events of the
// namespace. The subscription
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
	for _, t := range containerTopics {
		req.Filters = append(req.Filters, `topic=="`+t+`",namespace==`+ns)
	}
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

// eventName decodes the image name of an image event payload, or the
// container ID of a task or container event.
func eventName(topic string, payload []byte) (string, bool) {
	var task interface {
		proto.Message
		GetContainerID() string
	}
	var ctr interface {
		proto.Message
		GetID() string
	}
	switch topic {
	case TopicTaskStart:
		task = &eventsapi.TaskStart{}
	case TopicTaskExit:
		task = &eventsapi.TaskExit{}
	case TopicTaskDelete:
		task = &eventsapi.TaskDelete{}
	case TopicContainerCreate:
		ctr = &eventsapi.ContainerCreate{}
	case TopicContainerDelete:
		ctr = &eventsapi.ContainerDelete{}
	}
	switch {
	case task != nil:
		if err := proto.Unmarshal(payload, task); err != nil || task.GetContainerID() == "" {
			return "", false
		}
		return task.GetContainerID(), true
	case ctr != nil:
		if err := proto.Unmarshal(payload, ctr); err != nil || ctr.GetID() == "" {
			return "", false
		}
		return ctr.GetID(), true
	}
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
