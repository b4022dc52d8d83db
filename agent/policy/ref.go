// Package policy turns the policies of a pinwarden config into a compiled,
// immutable Set: it normalizes image references, matches repositories against
// policy globs (first match wins), loads signer keys and keyless identities,
// and fingerprints each policy so that cached verdicts die with the policy
// they were computed under.
package policy

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/pinwarden/pinwarden/agent/config"
)

// Ref is a normalized image reference. Repo is always fully qualified
// ("docker.io/library/nginx"); Tag and Digest are empty when not given.
type Ref struct {
	Repo   string
	Tag    string
	Digest string
}

// String renders the reference as repo[:tag][@digest].
func (r Ref) String() string {
	s := r.Repo
	if r.Tag != "" {
		s += ":" + r.Tag
	}
	if r.Digest != "" {
		s += "@" + r.Digest
	}
	return s
}

// ErrInvalidReference is wrapped by every ParseReference error.
var ErrInvalidReference = errors.New("invalid image reference")

var (
	// pathComponent is the distribution/reference grammar for one path
	// component of a repository name.
	pathComponent = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*$`)
	tagRE         = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)
	hexRE         = regexp.MustCompile(`^[0-9a-f]+$`)
)

// maxReferenceLen bounds the input before any parsing work.
const maxReferenceLen = 4096

// ValidateDigest accepts "sha256:<64 lowercase hex>" and "sha512:<128 lowercase hex>".
func ValidateDigest(d string) error {
	alg, hex, ok := strings.Cut(d, ":")
	if !ok {
		return fmt.Errorf("%w: digest %q has no algorithm", ErrInvalidReference, d)
	}
	want := 0
	switch alg {
	case "sha256":
		want = 64
	case "sha512":
		want = 128
	default:
		return fmt.Errorf("%w: digest algorithm %q not supported", ErrInvalidReference, alg)
	}
	if len(hex) != want || !hexRE.MatchString(hex) {
		return fmt.Errorf("%w: digest %q must be %d lowercase hex characters", ErrInvalidReference, d, want)
	}
	return nil
}

// ParseReference normalizes an image reference the Docker way: "nginx"
// becomes "docker.io/library/nginx", "ghcr.io/a/b:t@sha256:..." keeps both tag
// and digest. It rejects uppercase repositories, bad digests, empty or dot
// path segments and anything else outside the distribution grammar.
func ParseReference(s string) (Ref, error) {
	if s == "" || len(s) > maxReferenceLen {
		return Ref{}, fmt.Errorf("%w: empty or longer than %d bytes", ErrInvalidReference, maxReferenceLen)
	}
	if strings.TrimSpace(s) != s || strings.ContainsAny(s, " \t\r\n\\?#") {
		return Ref{}, fmt.Errorf("%w: %q contains whitespace or path characters", ErrInvalidReference, s)
	}
	var r Ref
	rest := s
	if i := strings.Index(s, "@"); i >= 0 {
		r.Digest = s[i+1:]
		rest = s[:i]
		if err := ValidateDigest(r.Digest); err != nil {
			return Ref{}, err
		}
	}
	// A tag follows the last ':' that comes after the last '/'.
	if i := strings.LastIndex(rest, ":"); i > strings.LastIndex(rest, "/") {
		r.Tag = rest[i+1:]
		rest = rest[:i]
		if !tagRE.MatchString(r.Tag) {
			return Ref{}, fmt.Errorf("%w: tag %q", ErrInvalidReference, r.Tag)
		}
	}
	if rest == "" || strings.HasPrefix(rest, "/") || strings.HasSuffix(rest, "/") || strings.Contains(rest, "//") {
		return Ref{}, fmt.Errorf("%w: %q has an empty path segment", ErrInvalidReference, s)
	}
	if strings.ToLower(rest) != rest {
		return Ref{}, fmt.Errorf("%w: %q: repositories are lowercase", ErrInvalidReference, s)
	}
	repo, err := name.NewRepository(rest)
	if err != nil {
		return Ref{}, fmt.Errorf("%w: %w", ErrInvalidReference, err)
	}
	if !config.ValidRegistryHost(repo.RegistryStr()) {
		return Ref{}, fmt.Errorf("%w: registry host %q of %q", ErrInvalidReference, repo.RegistryStr(), s)
	}
	path := repo.RepositoryStr()
	for _, seg := range strings.Split(path, "/") {
		if !pathComponent.MatchString(seg) {
			return Ref{}, fmt.Errorf("%w: path segment %q of %q", ErrInvalidReference, seg, s)
		}
	}
	reg := repo.RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	r.Repo = reg + "/" + path
	return r, nil
}

// Reference returns the ggcr reference for r: by digest when r has one,
// otherwise by tag ("latest" when none).
func (r Ref) Reference() (name.Reference, error) {
	if r.Digest != "" {
		return name.NewDigest(r.Repo+"@"+r.Digest, name.StrictValidation)
	}
	tag := r.Tag
	if tag == "" {
		tag = "latest"
	}
	return name.NewTag(r.Repo+":"+tag, name.StrictValidation)
}
