package verify

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"syscall"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// FailureError means verification ran and failed: the verdict is definitive
// (unverified) and Reason is one of the verdict.Reason* constants.
type FailureError struct {
	Reason string
	Err    error
}

func (e *FailureError) Error() string { return e.Reason + ": " + e.Err.Error() }
func (e *FailureError) Unwrap() error { return e.Err }

// RegistryError means pinwarden could not verify: the registry was
// unreachable or misbehaved. The verdict is pending, never verified.
type RegistryError struct {
	Unreachable bool
	Err         error
}

func (e *RegistryError) Error() string {
	if e.Unreachable {
		return "registry unreachable: " + e.Err.Error()
	}
	return "registry error: " + e.Err.Error()
}
func (e *RegistryError) Unwrap() error { return e.Err }

// ErrTooLarge is wrapped when a response, manifest, layer or list exceeds a limit.
var ErrTooLarge = errors.New("exceeds pinwarden's size or count limit")

func failure(reason string, format string, args ...any) *FailureError {
	return &FailureError{Reason: reason, Err: fmt.Errorf(format, args...)}
}

func tooLarge(format string, args ...any) *FailureError {
	return &FailureError{Reason: verdict.ReasonTooLarge, Err: fmt.Errorf("%w: %s", ErrTooLarge, fmt.Sprintf(format, args...))}
}

// classifyFetch turns an error from talking to a registry into a typed error.
// Size-limit errors are verification failures (too-large); everything else
// means "could not verify".
func classifyFetch(what string, err error) error {
	if err == nil {
		return nil
	}
	var fe *FailureError
	var re *RegistryError
	switch {
	case errors.As(err, &fe), errors.As(err, &re):
		return err
	case errors.Is(err, ErrTooLarge):
		return &FailureError{Reason: verdict.ReasonTooLarge, Err: fmt.Errorf("%s: %w", what, err)}
	}
	return &RegistryError{Unreachable: isUnreachable(err), Err: fmt.Errorf("%s: %w", what, err)}
}

// isUnreachable reports network-level failures: dial errors, DNS failures,
// timeouts, resets. HTTP status errors are not "unreachable".
func isUnreachable(err error) bool {
	var terr *transport.Error
	if errors.As(err, &terr) {
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	var oe *net.OpError
	var de *net.DNSError
	return errors.As(err, &oe) || errors.As(err, &de)
}

// isNotFound reports a registry 404 (manifest or tag unknown).
func isNotFound(err error) bool {
	var terr *transport.Error
	return errors.As(err, &terr) && terr.StatusCode == http.StatusNotFound
}
