package report

import (
	"errors"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// failingSink answers every call with err.
type failingSink struct{ err error }

func (f failingSink) Create(*corev1.Event) (*corev1.Event, error)        { return nil, f.err }
func (f failingSink) Update(*corev1.Event) (*corev1.Event, error)        { return nil, f.err }
func (f failingSink) Patch(*corev1.Event, []byte) (*corev1.Event, error) { return nil, f.err }

// TestRetryingSink: client-go's recorder gives an event up at the first
// *StatusError. A passing one (a 403 right after an API server restart, a
// 429, a 5xx) must reach it as a plain error, so that it retries; a final
// one (the event is invalid or exists) must stay a *StatusError.
func TestRetryingSink(t *testing.T) {
	gr := schema.GroupResource{Resource: "events"}
	for _, tt := range []struct {
		name  string
		err   error
		final bool
	}{
		{"forbidden while the authorizer warms up", apierrors.NewForbidden(gr, "e", errors.New("RBAC: not yet")), false},
		{"unauthorized", apierrors.NewUnauthorized("token"), false},
		{"too many requests", apierrors.NewTooManyRequests("slow down", 1), false},
		{"service unavailable", apierrors.NewServiceUnavailable("restarting"), false},
		{"internal error", apierrors.NewInternalError(errors.New("etcd")), false},
		{"server timeout", apierrors.NewServerTimeout(gr, "create", 1), false},
		{"already exists", apierrors.NewAlreadyExists(gr, "e"), true},
		{"invalid", apierrors.NewBadRequest("bad event"), true},
		{"not found (the recorder then creates)", apierrors.NewNotFound(gr, "e"), true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := retryingSink{failingSink{tt.err}}
			for op, call := range map[string]func() error{
				"create": func() error { _, err := s.Create(&corev1.Event{}); return err },
				"update": func() error { _, err := s.Update(&corev1.Event{}); return err },
				"patch":  func() error { _, err := s.Patch(&corev1.Event{}, nil); return err },
			} {
				err := call()
				_, status := err.(*apierrors.StatusError) // the recorder's own type switch
				if status != tt.final {
					t.Errorf("%s: %T %v: final = %v, want %v", op, err, err, status, tt.final)
				}
				if !errors.Is(err, tt.err) {
					t.Errorf("%s: %v does not wrap %v", op, err, tt.err)
				}
			}
		})
	}
	if retryable(nil) != nil {
		t.Error("retryable(nil) != nil")
	}
}
