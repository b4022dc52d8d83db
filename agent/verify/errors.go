package verify

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"strings"
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
		return &FailureError{Reason: verdict.ReasonTooLarge, Err: redacted(fmt.Errorf("%s: %w", what, err))}
	}
	return &RegistryError{Unreachable: isUnreachable(err), Err: redacted(fmt.Errorf("%s: %w", what, err))}
}

// redactedError hides the query strings and user info of every URL in the
// text of the error it wraps; errors.Is and errors.As still see the chain.
// Registry errors quote the URLs they failed on (net/http's url.Error quotes
// them whole) and a redirect may have led to a pre-signed URL whose query
// is a credential: go-containerregistry only redacts the URLs of blobs.
type redactedError struct{ err error }

func (e redactedError) Error() string { return redactURLs(e.err.Error()) }
func (e redactedError) Unwrap() error { return e.err }

func redacted(err error) error {
	if err == nil {
		return nil
	}
	return redactedError{err}
}

// urlInText finds URLs in error text: a scheme, "://", then anything up to
// whitespace or a quote.
var urlInText = regexp.MustCompile(`[A-Za-z][A-Za-z0-9+.-]*://[^\s"'<>]+`)

// redactURLs drops the user info, query and fragment of every URL in s,
// marking where a query was.
func redactURLs(s string) string {
	return urlInText.ReplaceAllStringFunc(s, func(u string) string {
		scheme, rest, _ := strings.Cut(u, "://")
		authEnd := strings.IndexAny(rest, "/?#")
		if authEnd < 0 {
			authEnd = len(rest)
		}
		if at := strings.LastIndex(rest[:authEnd], "@"); at >= 0 {
			rest = rest[at+1:]
		}
		query := ""
		if i := strings.IndexAny(rest, "?#"); i >= 0 {
			rest, query = rest[:i], "?REDACTED"
		}
		return scheme + "://" + rest + query
	})
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
	if errors.Is(err, errRefused) {
		// Only a request pinwarden refused (a redirect loop): the registry
		// answered, it is not unreachable.
		return false
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
