package cri

import (
	"errors"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestMapErr(t *testing.T) {
	t.Parallel()
	tests := []struct {
		code                  codes.Code
		notFound, unavailable bool
	}{
		{codes.NotFound, true, false},
		{codes.Unavailable, false, true},
		{codes.DeadlineExceeded, false, true},
		{codes.Internal, false, false},
		{codes.InvalidArgument, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.code.String(), func(t *testing.T) {
			t.Parallel()
			in := status.Error(tt.code, "boom")
			got := mapErr(in)
			if errors.Is(got, ErrNotFound) != tt.notFound || errors.Is(got, ErrUnavailable) != tt.unavailable {
				t.Errorf("mapErr(%v): notFound=%v unavailable=%v", tt.code, errors.Is(got, ErrNotFound), errors.Is(got, ErrUnavailable))
			}
			if got.Error() != in.Error() || status.Code(got) != tt.code {
				t.Errorf("mapErr changed the error: %q", got)
			}
			if !errors.Is(got, in) {
				t.Error("mapErr lost the original error from the chain")
			}
		})
	}
}

func TestEventName(t *testing.T) {
	t.Parallel()
	if _, ok := eventName("/containers/create", nil); ok {
		t.Error("non-image topic decoded")
	}
	if _, ok := eventName(TopicImageCreate, []byte{0xff, 0xff}); ok {
		t.Error("garbage payload decoded")
	}
	if _, ok := eventName(TopicImageDelete, nil); ok {
		t.Error("empty name accepted")
	}
}
