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

// Event is one image event from containerd. containerd events carry only the
// image name, never a digest.
type Event struct {
	Topic string // TopicImageCreate, TopicImageUpdate or TopicImageDelete
	Name  string // the containerd image name: "repo:tag", "repo@sha256:..." or "sha256:<id>"
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
