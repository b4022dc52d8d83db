package report

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/tools/record"
)

// retryingSink is the event broadcaster's sink. client-go's recorder drops an
// event at the first API status error ("will not retry!"). Some of those are
// passing: a 403 from an API server whose authorizer is still warming up
// after a restart, a 401 while a token is rotated, a 429 or a 5xx. A Warning
// lost there is lost for good, because the reported set already counts it
// as sent. retryingSink turns those errors into plain errors, which the
// recorder retries (client-go: up to 12 tries, 10 s apart); other status
// errors (an invalid event, one that already exists) stay final.
type retryingSink struct{ record.EventSink }

var _ record.EventSink = retryingSink{}

func (s retryingSink) Create(e *corev1.Event) (*corev1.Event, error) {
	ev, err := s.EventSink.Create(e)
	return ev, retryable(err)
}

func (s retryingSink) Update(e *corev1.Event) (*corev1.Event, error) {
	ev, err := s.EventSink.Update(e)
	return ev, retryable(err)
}

func (s retryingSink) Patch(e *corev1.Event, data []byte) (*corev1.Event, error) {
	ev, err := s.EventSink.Patch(e, data)
	return ev, retryable(err)
}

// retryable hides the *StatusError type of a passing API error from the
// recorder's type switch (errors.As still finds it).
func retryable(err error) error {
	switch {
	case err == nil:
		return nil
	case apierrors.IsForbidden(err), apierrors.IsUnauthorized(err), apierrors.IsTooManyRequests(err),
		apierrors.IsServiceUnavailable(err), apierrors.IsInternalError(err), apierrors.IsServerTimeout(err),
		apierrors.IsTimeout(err):
		return fmt.Errorf("write event (will retry): %w", err)
	default:
		return err
	}
}
