package policy

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pinwarden/pinwarden/agent/anchor"
	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/sigstore/sigstore-go/pkg/root"
	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"github.com/sigstore/sigstore/pkg/signature"
)

// fingerprintVersion changes whenever the meaning of a policy changes in
// code, so that verdicts cached by an older pinwarden are not trusted.
//
// v2: globs are normalized like references and identity regexps are
// anchored on their parsed form (issue 10); a v1 verdict may have been
// computed under a regexp that matched anyone.
const fingerprintVersion = "pinwarden-policy-v2"

// Size caps for files read at compile time.
const (
	maxKeyFileSize  = 64 << 10
	maxRootFileSize = 8 << 20
)

// Key is one trusted signing key of a policy.
type Key struct {
	// ID is "sha256:<hex of SHA-256 of the DER (PKIX) public key>".
	ID        string
	Path      string
	PublicKey crypto.PublicKey
	Verifier  signature.Verifier
}

// Identity is one trusted keyless signer: an OIDC issuer (exact) and a
// certificate subject, exact or an ANCHORED regular expression.
type Identity struct {
	Issuer  string
	Subject string
	// SubjectRegExp is the configured regexp anchored on its parsed form
	// (anchor.Regexp); empty when Subject is set.
	SubjectRegExp string
	re            *regexp.Regexp
}

// String renders the identity as configured ("issuer subject-or-regexp").
func (id Identity) String() string {
	if id.Subject != "" {
		return id.Issuer + " " + id.Subject
	}
	return id.Issuer + " " + id.SubjectRegExp
}

// Matches reports whether a certificate's issuer and subject satisfy id.
func (id Identity) Matches(issuer, subject string) bool {
	if issuer != id.Issuer {
		return false
	}
	if id.Subject != "" {
		return subject == id.Subject
	}
	return id.re != nil && id.re.MatchString(subject)
}

// Policy is one compiled policy. It is immutable after Compile.
type Policy struct {
	Name        string
	Images      []string
	Deny        bool
	Ignore      bool
	Threshold   int
	RequireTlog bool
	// Fingerprint is the hex SHA-256 over the policy's content, its key files
	// and (when the policy uses it) the trusted root file.
	Fingerprint string
	Keys        []Key
	Identities  []Identity
	// TrustedRoot is the sigstore trusted root, nil when none is configured.
	TrustedRoot *root.TrustedRoot

	globs [][]string
}

// Set is a compiled list of policies; first match wins. Safe for concurrent use.
type Set struct {
	Policies []*Policy

	// matches memoizes Match per repository (repo -> *Policy, nil for none):
	// a relist asks for every image again. Bounded by maxMemo; a new Set
	// (reload) starts empty.
	matches  sync.Map
	memoSize atomic.Int64

	// unavailable, when set, is why there are no usable policies yet (the
	// files a config names are missing or broken): every repository is
	// pending, never verified and never untrusted.
	unavailable error
}

// Unavailable returns a Set that decides every repository pending, with
// cause in the detail. The agent runs with it while the keys, trusted root,
// docker config or pin files that its config names cannot be loaded, and
// swaps it for a compiled Set as soon as they can.
func Unavailable(cause error) *Set {
	if cause == nil {
		cause = errors.New("no policies loaded")
	}
	return &Set{unavailable: cause}
}

// Err returns why the Set is Unavailable, nil for a compiled Set.
func (s *Set) Err() error {
	if s == nil {
		return nil
	}
	return s.unavailable
}

// maxMemo bounds the repositories whose match a Set remembers.
const maxMemo = 16384

// Compile loads key files and the trusted root and compiles every policy of
// cfg. Errors name the policy and the file at fault.
func Compile(cfg *config.Config) (*Set, error) {
	if cfg == nil {
		return nil, errors.New("compile policies: nil config")
	}
	var (
		tr       *root.TrustedRoot
		rootHash string
	)
	if cfg.TrustedRoot != "" {
		b, err := readCapped(cfg.TrustedRoot, maxRootFileSize)
		if err != nil {
			return nil, fmt.Errorf("trustedRoot: %w", err)
		}
		tr, err = root.NewTrustedRootFromJSON(b)
		if err != nil {
			return nil, fmt.Errorf("trustedRoot %s: %w", cfg.TrustedRoot, err)
		}
		h := sha256.Sum256(b)
		rootHash = hex.EncodeToString(h[:])
	}
	set := &Set{}
	var errs []error
	for i := range cfg.Policies {
		p, err := compileOne(cfg.Policies[i], tr, rootHash)
		if err != nil {
			errs = append(errs, fmt.Errorf("policy %q: %w", cfg.Policies[i].Name, err))
			continue
		}
		set.Policies = append(set.Policies, p)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return set, nil
}

// fingerprintInput is what a fingerprint covers; JSON keeps it unambiguous.
type fingerprintInput struct {
	Version     string     `json:"v"`
	Name        string     `json:"name"`
	Images      []string   `json:"images"`
	Deny        bool       `json:"deny"`
	Ignore      bool       `json:"ignore"`
	Threshold   int        `json:"threshold"`
	RequireTlog bool       `json:"tlog"`
	KeyHashes   []string   `json:"keys"`
	Identities  [][]string `json:"identities"`
	RootHash    string     `json:"root"`
}

func compileOne(cp config.Policy, tr *root.TrustedRoot, rootHash string) (*Policy, error) {
	if cp.Name == "" {
		return nil, errors.New("name is required")
	}
	if len(cp.Images) == 0 {
		return nil, errors.New("no image globs")
	}
	p := &Policy{
		Name:        cp.Name,
		Images:      append([]string(nil), cp.Images...),
		Deny:        cp.Deny,
		Ignore:      cp.Ignore,
		Threshold:   cp.EffectiveThreshold(),
		RequireTlog: cp.RequireTlog(),
	}
	for i, g := range cp.Images {
		n, err := config.NormalizeGlob(g)
		if err != nil {
			return nil, err
		}
		p.Images[i] = n
		p.globs = append(p.globs, strings.Split(n, "/"))
	}
	fp := fingerprintInput{
		Version: fingerprintVersion, Name: p.Name, Images: p.Images, Deny: p.Deny, Ignore: p.Ignore,
		Threshold: p.Threshold, RequireTlog: p.RequireTlog, KeyHashes: []string{}, Identities: [][]string{},
	}
	if !p.Deny && !p.Ignore {
		if len(cp.Keys)+len(cp.Keyless) == 0 {
			return nil, errors.New("needs keys or keyless identities")
		}
		if p.Threshold > len(cp.Keys)+len(cp.Keyless) {
			return nil, fmt.Errorf("threshold %d exceeds the %d keys and identities", p.Threshold, len(cp.Keys)+len(cp.Keyless))
		}
		seen := map[string]string{}
		for _, kp := range cp.Keys {
			k, raw, err := loadKey(kp)
			if err != nil {
				return nil, fmt.Errorf("key %s: %w", kp, err)
			}
			if other, dup := seen[k.ID]; dup {
				// Two paths holding one key would let one signer count twice.
				return nil, fmt.Errorf("key %s: same public key as %s", kp, other)
			}
			seen[k.ID] = kp
			p.Keys = append(p.Keys, k)
			h := sha256.Sum256(raw)
			fp.KeyHashes = append(fp.KeyHashes, hex.EncodeToString(h[:]))
		}
		for j, kl := range cp.Keyless {
			id, err := compileIdentity(kl)
			if err != nil {
				return nil, fmt.Errorf("keyless[%d]: %w", j, err)
			}
			p.Identities = append(p.Identities, id)
			fp.Identities = append(fp.Identities, []string{id.Issuer, id.Subject, id.SubjectRegExp})
		}
		if len(p.Identities) > 0 && !p.RequireTlog {
			return nil, errors.New("keyless identities need a transparency-log proof (tlog)")
		}
		if (len(p.Identities) > 0 || p.RequireTlog) && tr == nil {
			return nil, errors.New("keyless identities and tlog: true need trustedRoot")
		}
		if len(p.Identities) > 0 || p.RequireTlog {
			p.TrustedRoot = tr
			fp.RootHash = rootHash
		}
	}
	b, err := json.Marshal(fp)
	if err != nil {
		return nil, fmt.Errorf("fingerprint: %w", err)
	}
	h := sha256.Sum256(b)
	p.Fingerprint = hex.EncodeToString(h[:])
	return p, nil
}

func compileIdentity(kl config.Keyless) (Identity, error) {
	id := Identity{Issuer: kl.Issuer, Subject: kl.Subject}
	switch {
	case kl.Issuer == "":
		return Identity{}, errors.New("issuer is required")
	case kl.Subject == "" && kl.SubjectRegExp == "":
		return Identity{}, errors.New("subject or subjectRegExp is required")
	case kl.Subject != "" && kl.SubjectRegExp != "":
		return Identity{}, errors.New("subject and subjectRegExp are exclusive")
	case kl.SubjectRegExp != "":
		s, re, err := anchor.Regexp(kl.SubjectRegExp)
		if err != nil {
			return Identity{}, fmt.Errorf("subjectRegExp: %w", err)
		}
		id.SubjectRegExp, id.re = s, re
	}
	return id, nil
}

func loadKey(p string) (Key, []byte, error) {
	raw, err := readCapped(p, maxKeyFileSize)
	if err != nil {
		return Key{}, nil, err
	}
	pub, err := cryptoutils.UnmarshalPEMToPublicKey(raw)
	if err != nil {
		return Key{}, nil, fmt.Errorf("parse PEM public key: %w", err)
	}
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return Key{}, nil, fmt.Errorf("ECDSA curve %s not supported (P-256, P-384)", k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return Key{}, nil, fmt.Errorf("RSA key of %d bits is too small (minimum 2048)", k.N.BitLen())
		}
	default:
		return Key{}, nil, fmt.Errorf("unsupported public key type %T", pub)
	}
	// cosign verifies every key type with SHA-256 (LoadPublicKeyRaw); match it.
	v, err := signature.LoadVerifier(pub, crypto.SHA256)
	if err != nil {
		return Key{}, nil, fmt.Errorf("load verifier: %w", err)
	}
	id, err := KeyID(pub)
	if err != nil {
		return Key{}, nil, err
	}
	return Key{ID: id, Path: p, PublicKey: pub, Verifier: v}, raw, nil
}

// KeyID returns "sha256:<hex of SHA-256 of the DER (PKIX) public key>".
func KeyID(pub crypto.PublicKey) (string, error) {
	der, err := cryptoutils.MarshalPublicKeyToDER(pub)
	if err != nil {
		return "", fmt.Errorf("marshal public key: %w", err)
	}
	h := sha256.Sum256(der)
	return "sha256:" + hex.EncodeToString(h[:]), nil
}

func readCapped(p string, limit int64) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", p, limit)
	}
	return b, nil
}

// Match returns the first policy whose globs match the normalized repository,
// or nil when none does.
func (s *Set) Match(repo string) *Policy {
	if s == nil {
		return nil
	}
	if p, ok := s.matches.Load(repo); ok {
		return p.(*Policy)
	}
	p := s.match(repo)
	if s.memoSize.Load() < maxMemo {
		if _, loaded := s.matches.LoadOrStore(repo, p); !loaded {
			s.memoSize.Add(1)
		}
	}
	return p
}

func (s *Set) match(repo string) *Policy {
	segs := strings.Split(repo, "/")
	for _, p := range s.Policies {
		for _, g := range p.globs {
			if matchSegments(g, segs) {
				return p
			}
		}
	}
	return nil
}

// matchSegments matches glob segments against path segments: "**" spans zero
// or more whole segments, "*" stays within one segment.
func matchSegments(glob, segs []string) bool {
	for len(glob) > 0 {
		if glob[0] == "**" {
			rest := glob[1:]
			for i := 0; i <= len(segs); i++ {
				if matchSegments(rest, segs[i:]) {
					return true
				}
			}
			return false
		}
		if len(segs) == 0 {
			return false
		}
		ok, err := path.Match(glob[0], segs[0])
		if err != nil || !ok {
			return false
		}
		glob, segs = glob[1:], segs[1:]
	}
	return len(segs) == 0
}

// Decide returns the static outcome for repo: untrusted/no-policy when no
// policy matches, untrusted/denied for a deny policy, ignored for an ignore
// policy, and pending/queued for every repository of an Unavailable set.
// Otherwise it returns the policy to verify with and a nil Result.
func (s *Set) Decide(repo string) (*Policy, *verdict.Result) {
	if err := s.Err(); err != nil {
		return nil, &verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonQueued, VerifiedAt: time.Now(),
			Detail: "no usable policy yet: " + err.Error()}
	}
	p := s.Match(repo)
	if p != nil && !p.Deny && !p.Ignore {
		return p, nil
	}
	now := time.Now()
	switch {
	case p == nil:
		return nil, &verdict.Result{Verdict: verdict.Untrusted, Reason: verdict.ReasonNoPolicy, VerifiedAt: now,
			Detail: "no policy matches " + repo}
	case p.Deny:
		return p, &verdict.Result{Verdict: verdict.Untrusted, Reason: verdict.ReasonDenied, Policy: p.Name,
			Fingerprint: p.Fingerprint, VerifiedAt: now, Detail: "denied by policy " + p.Name}
	case p.Ignore:
		return p, &verdict.Result{Verdict: verdict.Ignored, Policy: p.Name, Fingerprint: p.Fingerprint, VerifiedAt: now}
	}
	return p, nil
}
