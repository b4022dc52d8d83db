// Package config loads and validates pinwarden's YAML configuration file.
//
// Loading is strict: unknown keys, bad globs, missing key files, keyless
// policies without an identity and invalid regular expressions are errors that
// name the file, the key and the reason. Defaults follow the CONTRACT. Image
// globs are normalized here the way image references are (NormalizeGlob).
package config

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/pinwarden/pinwarden/agent/anchor"
)

// Config is the whole configuration file.
type Config struct {
	RuntimeEndpoint     string     `json:"runtimeEndpoint"`
	ContainerdNamespace string     `json:"containerdNamespace"`
	NodeName            string     `json:"nodeName"`
	StateDir            string     `json:"stateDir"`
	MetricsAddress      string     `json:"metricsAddress"`
	StatusAddress       string     `json:"statusAddress"`
	ResyncInterval      Duration   `json:"resyncInterval"`
	MaxProblemSeries    int        `json:"maxProblemSeries"`
	Cache               Cache      `json:"cache"`
	Registries          Registries `json:"registries"`
	TrustedRoot         string     `json:"trustedRoot"`
	Policies            []Policy   `json:"policies"`
	Pins                []string   `json:"pins"`
	Prefetch            Prefetch   `json:"prefetch"`
	Kubernetes          Kubernetes `json:"kubernetes"`

	// Path is the file the config was loaded from ("" when built in code).
	Path string `json:"-"`
}

// Cache configures the verdict cache.
type Cache struct {
	VerifiedTTL Duration `json:"verifiedTTL"`
	FailedTTL   Duration `json:"failedTTL"`
}

// Registries configures registry access.
type Registries struct {
	Insecure     []string `json:"insecure"`     // host:port reached over plain HTTP
	DockerConfig string   `json:"dockerConfig"` // docker config.json with credentials
	// RequestsPerSecond and Burst rate-limit registry requests per host.
	RequestsPerSecond float64 `json:"requestsPerSecond"`
	Burst             int     `json:"burst"`
	// CredentialProviderConfig and CredentialProviderBinDir are the kubelet's
	// CredentialProviderConfig file and plugin directory (both or neither).
	CredentialProviderConfig string `json:"credentialProviderConfig"`
	CredentialProviderBinDir string `json:"credentialProviderBinDir"`
	// ContainerdHostsDir is containerd's hosts.toml directory (mirrors, CAs,
	// client certificates); a missing directory configures nothing.
	ContainerdHostsDir string `json:"containerdHostsDir"`
	// PodPullSecrets opts in to the imagePullSecrets of the pods running an
	// image, read through the Kubernetes client (needs kubernetes.enabled).
	PodPullSecrets bool `json:"podPullSecrets"`
}

// Policy is one entry of policies; the first policy whose images match wins.
type Policy struct {
	Name      string    `json:"name"`
	Images    []string  `json:"images"`
	Keys      []string  `json:"keys,omitempty"`
	Keyless   []Keyless `json:"keyless,omitempty"`
	Threshold int       `json:"threshold,omitempty"`
	// Tlog requires a transparency-log proof. nil means the default: false
	// for keys, true for keyless identities.
	Tlog   *bool `json:"tlog,omitempty"`
	Deny   bool  `json:"deny,omitempty"`
	Ignore bool  `json:"ignore,omitempty"`
}

// Keyless is one accepted Fulcio identity.
type Keyless struct {
	Issuer        string `json:"issuer"`
	Subject       string `json:"subject,omitempty"`
	SubjectRegExp string `json:"subjectRegExp,omitempty"`
}

// Prefetch configures prefetching of pinned digests.
type Prefetch struct {
	Enabled     bool `json:"enabled"`
	Concurrency int  `json:"concurrency"`
	// PinGC labels prefetched images io.cri-containerd.pinned=pinned so that
	// kubelet's image garbage collection keeps them.
	PinGC bool `json:"pinGC"`
}

// Kubernetes configures reporting to the API server.
type Kubernetes struct {
	Enabled         bool   `json:"enabled"`
	Kubeconfig      string `json:"kubeconfig"`
	Events          bool   `json:"events"`
	NodeCondition   bool   `json:"nodeCondition"`
	QuarantineTaint bool   `json:"quarantineTaint"`
	// QuarantineMaxUnavailable is the blast-radius guard: at most this many
	// nodes ("3") or this share of the nodes ("10%") carry the quarantine
	// taint; empty: no guard. See ParseMaxUnavailable.
	QuarantineMaxUnavailable string `json:"quarantineMaxUnavailable"`
}

// Duration is a time.Duration written in Go syntax ("5m", "24h").
type Duration struct{ time.Duration }

// UnmarshalJSON accepts a Go duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if string(b) == "null" {
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("invalid duration %q: %w", s, err)
	}
	d.Duration = v
	return nil
}

// MarshalJSON writes a Go duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return []byte(`"` + d.String() + `"`), nil }

// Default returns the configuration with every default of the CONTRACT.
func Default() *Config {
	return &Config{
		RuntimeEndpoint:     "unix:///run/containerd/containerd.sock",
		ContainerdNamespace: "k8s.io",
		StateDir:            "/var/lib/pinwarden",
		MetricsAddress:      ":9842",
		StatusAddress:       "127.0.0.1:9843",
		ResyncInterval:      Duration{5 * time.Minute},
		MaxProblemSeries:    500,
		Cache:               Cache{VerifiedTTL: Duration{24 * time.Hour}, FailedTTL: Duration{10 * time.Minute}},
		Registries:          Registries{Insecure: []string{}, RequestsPerSecond: 50, Burst: 100, ContainerdHostsDir: "/etc/containerd/certs.d"},
		Policies:            []Policy{},
		Pins:                []string{},
		Prefetch:            Prefetch{Enabled: true, Concurrency: 4, PinGC: true},
		Kubernetes:          Kubernetes{Enabled: true, Events: true, NodeCondition: true},
	}
}

// Load reads, parses and validates the config file at path, including that
// every file it names exists.
func Load(path string) (*Config, error) { return load(path, true) }

// LoadStatic is Load without looking at the files the config names (keys,
// trustedRoot, dockerConfig, pins): the agent starts with a config whose
// Secret is not mounted yet, and waits for the files.
func LoadStatic(path string) (*Config, error) { return load(path, false) }

func load(path string, files bool) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	c, err := parse(b, filepath.Dir(path), files)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	c.Path = path
	return c, nil
}

// Parse parses and validates config bytes. Relative paths inside the config
// (keys, pins, trustedRoot, dockerConfig, stateDir) resolve against baseDir.
func Parse(b []byte, baseDir string) (*Config, error) { return parse(b, baseDir, true) }

func parse(b []byte, baseDir string, files bool) (*Config, error) {
	c := Default()
	if len(bytes.TrimSpace(b)) > 0 {
		if err := yaml.UnmarshalStrict(b, c); err != nil {
			return nil, fmt.Errorf("parse: %w", err)
		}
	}
	c.resolvePaths(baseDir)
	if err := c.validate(files); err != nil {
		return nil, err
	}
	return c, nil
}

// Files lists every file the config names: key files, the trusted root,
// the docker config and the pin files (not the kubeconfig, read once at
// start). These are what a reload re-reads.
func (c *Config) Files() []string {
	var out []string
	add := func(p string) {
		if p != "" && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	add(c.TrustedRoot)
	add(c.Registries.DockerConfig)
	add(c.Registries.CredentialProviderConfig)
	for _, p := range c.Policies {
		for _, k := range p.Keys {
			add(k)
		}
	}
	for _, p := range c.Pins {
		add(p)
	}
	return out
}

func (c *Config) resolvePaths(base string) {
	abs := func(p string) string {
		if p == "" || filepath.IsAbs(p) || base == "" {
			return p
		}
		return filepath.Join(base, p)
	}
	c.TrustedRoot = abs(c.TrustedRoot)
	c.Registries.DockerConfig = abs(c.Registries.DockerConfig)
	c.Registries.CredentialProviderConfig = abs(c.Registries.CredentialProviderConfig)
	c.Registries.CredentialProviderBinDir = abs(c.Registries.CredentialProviderBinDir)
	c.Registries.ContainerdHostsDir = abs(c.Registries.ContainerdHostsDir)
	c.Kubernetes.Kubeconfig = abs(c.Kubernetes.Kubeconfig)
	for i := range c.Pins {
		c.Pins[i] = abs(c.Pins[i])
	}
	for i := range c.Policies {
		for j := range c.Policies[i].Keys {
			c.Policies[i].Keys[j] = abs(c.Policies[i].Keys[j])
		}
	}
}

// Validate checks every field, and that the files the config names exist,
// and returns all problems found, joined.
func (c *Config) Validate() error { return c.validate(true) }

// ValidateStatic is Validate without looking at the files the config names.
func (c *Config) ValidateStatic() error { return c.validate(false) }

func (c *Config) validate(files bool) error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if !strings.HasPrefix(c.RuntimeEndpoint, "unix://") && !strings.HasPrefix(c.RuntimeEndpoint, "/") {
		bad("runtimeEndpoint", "must be a unix:// socket, got %q", c.RuntimeEndpoint)
	}
	if c.ContainerdNamespace == "" {
		bad("containerdNamespace", "must not be empty")
	}
	if c.StateDir == "" {
		bad("stateDir", "must not be empty")
	}
	if c.ResyncInterval.Duration <= 0 {
		bad("resyncInterval", "must be positive")
	}
	if c.MaxProblemSeries < 1 {
		bad("maxProblemSeries", "must be at least 1")
	}
	if c.Cache.VerifiedTTL.Duration <= 0 {
		bad("cache.verifiedTTL", "must be positive")
	}
	if c.Cache.FailedTTL.Duration <= 0 {
		bad("cache.failedTTL", "must be positive")
	}
	if c.Prefetch.Concurrency < 1 || c.Prefetch.Concurrency > 64 {
		bad("prefetch.concurrency", "must be between 1 and 64, got %d", c.Prefetch.Concurrency)
	}
	for i, h := range c.Registries.Insecure {
		if h == "" || strings.ContainsAny(h, "/ ") {
			bad(fmt.Sprintf("registries.insecure[%d]", i), "must be host or host:port, got %q", h)
		}
	}
	if c.Registries.RequestsPerSecond <= 0 || c.Registries.RequestsPerSecond > 10000 {
		bad("registries.requestsPerSecond", "must be above 0 and at most 10000, got %v", c.Registries.RequestsPerSecond)
	}
	if c.Registries.Burst < 1 || c.Registries.Burst > 10000 {
		bad("registries.burst", "must be between 1 and 10000, got %d", c.Registries.Burst)
	}
	if c.Registries.PodPullSecrets && !c.Kubernetes.Enabled {
		bad("registries.podPullSecrets", "needs kubernetes.enabled: true: the pods that run an image and their "+
			"imagePullSecrets are read from the API server")
	}
	if _, _, err := ParseMaxUnavailable(c.Kubernetes.QuarantineMaxUnavailable); err != nil {
		bad("kubernetes.quarantineMaxUnavailable", "%v", err)
	}
	if c.Registries.DockerConfig != "" && files {
		if _, err := os.Stat(c.Registries.DockerConfig); err != nil {
			bad("registries.dockerConfig", "%v", err)
		}
	}
	if files {
		errs = append(errs, c.Registries.validateNodeSources()...)
	}
	if c.TrustedRoot != "" && files {
		if _, err := os.Stat(c.TrustedRoot); err != nil {
			bad("trustedRoot", "%v", err)
		}
	}
	for i, p := range c.Pins {
		if p == "" {
			bad(fmt.Sprintf("pins[%d]", i), "empty path")
		}
	}
	names := map[string]bool{}
	for i, p := range c.Policies {
		key := fmt.Sprintf("policies[%d]", i)
		if p.Name != "" {
			key = fmt.Sprintf("policies[%d] (%s)", i, p.Name)
		}
		if p.Name == "" {
			bad(key, "name is required")
		} else if names[p.Name] {
			bad(key, "duplicate policy name %q", p.Name)
		}
		names[p.Name] = true
		if len(p.Images) == 0 {
			bad(key+".images", "at least one glob is required")
		}
		for j, g := range p.Images {
			if _, err := NormalizeGlob(g); err != nil {
				bad(fmt.Sprintf("%s.images[%d]", key, j), "%v", err)
			}
		}
		if p.Deny && p.Ignore {
			bad(key, "deny and ignore are exclusive")
		}
		if p.Deny || p.Ignore {
			if len(p.Keys) > 0 || len(p.Keyless) > 0 {
				bad(key, "a deny or ignore policy takes no keys or keyless identities")
			}
			continue
		}
		if len(p.Keys) == 0 && len(p.Keyless) == 0 {
			bad(key, "needs keys or keyless identities (or deny/ignore)")
		}
		for j, k := range p.Keys {
			if _, err := os.Stat(k); files && err != nil {
				bad(fmt.Sprintf("%s.keys[%d]", key, j), "%v", err)
			}
		}
		for j, id := range p.Keyless {
			ik := fmt.Sprintf("%s.keyless[%d]", key, j)
			if id.Issuer == "" {
				bad(ik+".issuer", "is required")
			}
			switch {
			case id.Subject == "" && id.SubjectRegExp == "":
				bad(ik, "subject or subjectRegExp is required: a keyless identity without a subject would accept any signer")
			case id.Subject != "" && id.SubjectRegExp != "":
				bad(ik, "subject and subjectRegExp are exclusive")
			case id.SubjectRegExp != "":
				if _, _, err := anchor.Regexp(id.SubjectRegExp); err != nil {
					bad(ik+".subjectRegExp", "%v", err)
				}
			}
		}
		if len(p.Keyless) > 0 && c.TrustedRoot == "" {
			bad(key+".keyless", "needs trustedRoot to be set")
		}
		n := len(p.Keys) + len(p.Keyless)
		if p.Threshold < 0 || p.Threshold > n {
			bad(key+".threshold", "must be between 1 and %d (the number of keys and identities), got %d", n, p.Threshold)
		}
		if p.Tlog != nil && !*p.Tlog && len(p.Keyless) > 0 {
			bad(key+".tlog", "keyless identities need a transparency-log proof; tlog: false is only allowed for keys")
		}
		if p.RequireTlog() && len(p.Keyless) == 0 && c.TrustedRoot == "" {
			bad(key+".tlog", "tlog: true on keys %s needs trustedRoot to be set (it holds the transparency-log keys)",
				strings.Join(p.Keys, ", "))
		}
	}
	return errors.Join(errs...)
}

// EffectiveThreshold is Threshold, or 1 when unset.
func (p Policy) EffectiveThreshold() int {
	if p.Threshold <= 0 {
		return 1
	}
	return p.Threshold
}

// RequireTlog reports whether a transparency-log proof is required.
func (p Policy) RequireTlog() bool {
	if p.Tlog != nil {
		return *p.Tlog
	}
	return len(p.Keyless) > 0
}

// ValidateGlob checks a repository glob: path segments of [a-z0-9._-:] with
// '*' within a segment and '**' as a whole segment.
func ValidateGlob(g string) error {
	if g == "" {
		return errors.New("empty glob")
	}
	if strings.HasPrefix(g, "/") || strings.HasSuffix(g, "/") || strings.Contains(g, "//") {
		return fmt.Errorf("invalid glob %q: empty path segment", g)
	}
	if strings.ContainsAny(g, "@") {
		return fmt.Errorf("invalid glob %q: globs match repositories, not digests", g)
	}
	for _, seg := range strings.Split(g, "/") {
		if strings.Contains(seg, "**") && seg != "**" {
			return fmt.Errorf("invalid glob %q: ** must be a whole path segment", g)
		}
		for _, r := range seg {
			switch {
			case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '.', r == '_', r == '-', r == ':', r == '*':
			case r >= 'A' && r <= 'Z':
				return fmt.Errorf("invalid glob %q: repositories are lowercase", g)
			default:
				return fmt.Errorf("invalid glob %q: character %q not allowed", g, r)
			}
		}
	}
	return nil
}

// FileHash returns the hex SHA-256 of a file's content, for fingerprints.
func FileHash(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:]), nil
}

// validateNodeSources checks the keys that point pinwarden at the node's own
// credentials and registry hosts configuration.
func (r *Registries) validateNodeSources() []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("registries.%s: %s", key, fmt.Sprintf(format, args...)))
	}
	switch {
	case r.CredentialProviderConfig != "" && r.CredentialProviderBinDir == "":
		bad("credentialProviderBinDir", "required with credentialProviderConfig")
	case r.CredentialProviderConfig == "" && r.CredentialProviderBinDir != "":
		bad("credentialProviderConfig", "required with credentialProviderBinDir")
	}
	if r.CredentialProviderConfig != "" {
		if st, err := os.Stat(r.CredentialProviderConfig); err != nil {
			bad("credentialProviderConfig", "%v", err)
		} else if st.IsDir() {
			bad("credentialProviderConfig", "%s is a directory", r.CredentialProviderConfig)
		}
	}
	if r.CredentialProviderBinDir != "" {
		if st, err := os.Stat(r.CredentialProviderBinDir); err != nil {
			bad("credentialProviderBinDir", "%v", err)
		} else if !st.IsDir() {
			bad("credentialProviderBinDir", "%s is not a directory", r.CredentialProviderBinDir)
		}
	}
	if r.ContainerdHostsDir != "" {
		if st, err := os.Stat(r.ContainerdHostsDir); err == nil && !st.IsDir() {
			bad("containerdHostsDir", "%s is not a directory", r.ContainerdHostsDir)
		} else if err != nil && !errors.Is(err, os.ErrNotExist) {
			bad("containerdHostsDir", "%v", err)
		}
	}
	return errs
}

// hostRE is the registry host grammar of globs and image references: DNS
// labels separated by dots, or a bracketed IPv6 literal, then an optional port.
var hostRE = regexp.MustCompile(`^(?:(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?$`)

// ValidRegistryHost reports whether h is a registry host (lowercase DNS
// name or bracketed IPv6 literal, optional port), for globs and references.
func ValidRegistryHost(h string) bool { return hostRE.MatchString(h) }

// NormalizeGlob validates a repository glob and normalizes it the way image
// references are normalized, so that it can match the fully qualified
// repositories pinwarden judges: no registry means Docker Hub ("nginx" and
// "library/nginx" become "docker.io/library/nginx"), "index.docker.io" is
// "docker.io", and a single path segment on Docker Hub gets "library/".
// The first segment is a registry host when it is "localhost" or contains
// '.' or ':', as for references. A glob whose first segment is a wildcard
// without '.' or ':' ("*/nginx") is refused: as a reference it would be a
// Docker Hub namespace, which is rarely what its author meant; the error
// names both readings.
func NormalizeGlob(g string) (string, error) {
	if err := ValidateGlob(g); err != nil {
		return "", err
	}
	segs := strings.Split(g, "/")
	first := segs[0]
	if first == "**" {
		return g, nil // spans every registry already
	}
	host, path := "", segs
	switch {
	case len(segs) >= 2 && (first == "localhost" || strings.ContainsAny(first, ".:")):
		host, path = first, segs[1:]
	case len(segs) >= 2 && strings.Contains(first, "*"):
		return "", fmt.Errorf("ambiguous glob %q: without '.' or ':' its first segment is a Docker Hub namespace, "+
			"so it means %q; to match registry hosts write %q or a host pattern with a dot (\"*.example.com/...\")",
			g, "docker.io/"+g, "**/"+strings.Join(segs[1:], "/"))
	default:
		host = "docker.io"
	}
	if host == "index.docker.io" {
		host = "docker.io"
	}
	if !strings.Contains(host, "*") && !hostRE.MatchString(host) {
		return "", fmt.Errorf("invalid glob %q: registry host %q", g, host)
	}
	if host == "docker.io" && len(path) == 1 && path[0] != "**" {
		path = []string{"library", path[0]}
	}
	return host + "/" + strings.Join(path, "/"), nil
}
