// Package credprovider runs the kubelet's image credential provider plugins
// (ECR, ACR, GAR and the like) the way the kubelet does: it reads the same
// CredentialProviderConfig file (kubelet.config.k8s.io/v1) and plugin
// directory, matches images against each provider's matchImages, runs the
// plugin over the exec protocol (credentialprovider.kubelet.k8s.io/v1 on
// stdin/stdout), and caches answers for the cacheDuration and cacheKeyType
// the plugin asks for. It is a go-containerregistry keychain.
//
// Credentials that plugins return are secrets: nothing in this package logs
// them or puts them into an error.
package credprovider

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"golang.org/x/sync/singleflight"
	kubeletconfig "k8s.io/kubelet/config/v1"
	credv1 "k8s.io/kubelet/pkg/apis/credentialprovider/v1"
	"sigs.k8s.io/yaml"
)

// The config and protocol versions this package speaks.
const (
	configGroup     = "kubelet.config.k8s.io/"
	configKind      = "CredentialProviderConfig"
	protocolV1      = "credentialprovider.kubelet.k8s.io/v1"
	requestKind     = "CredentialProviderRequest"
	responseKind    = "CredentialProviderResponse"
	maxConfigSize   = 1 << 20
	maxResponseSize = 1 << 20
)

// DefaultTimeout bounds one plugin run, as the kubelet's exec timeout does.
const DefaultTimeout = time.Minute

// Option configures a Keychain.
type Option func(*Keychain)

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(k *Keychain) { k.log = l } }

// WithTimeout bounds one plugin run (default DefaultTimeout).
func WithTimeout(d time.Duration) Option { return func(k *Keychain) { k.timeout = d } }

// WithClock replaces time.Now (tests).
func WithClock(now func() time.Time) Option { return func(k *Keychain) { k.now = now } }

// Keychain resolves credentials by running credential provider plugins. It
// is safe for concurrent use.
type Keychain struct {
	providers []*provider
	timeout   time.Duration
	now       func() time.Time
	log       *slog.Logger
}

var _ authn.ContextKeychain = (*Keychain)(nil)

// provider is one configured plugin and its answer cache.
type provider struct {
	name        string
	path        string
	apiVersion  string
	matchImages []string
	defaultTTL  time.Duration
	args        []string
	env         []string

	group singleflight.Group
	mu    sync.Mutex       // guards cache
	cache map[string]entry // cache key -> answer
}

// entry is one cached plugin answer.
type entry struct {
	auth    map[string]credv1.AuthConfig
	expires time.Time
}

// Load reads the CredentialProviderConfig at configPath and checks that each
// provider's plugin is an executable file in binDir. It refuses what the
// kubelet refuses: no providers, bad or duplicate names, empty matchImages,
// a missing or negative defaultCacheDuration, an unknown apiVersion.
// Providers that need a pod's service account token (tokenAttributes) cannot
// run outside the kubelet and are skipped with a warning.
func Load(configPath, binDir string, opts ...Option) (*Keychain, error) {
	k := &Keychain{timeout: DefaultTimeout, now: time.Now, log: slog.New(slog.DiscardHandler)}
	for _, o := range opts {
		o(k)
	}
	cfg, err := readConfig(configPath)
	if err != nil {
		return nil, err
	}
	if binDir == "" {
		return nil, fmt.Errorf("credential provider config %s: no plugin directory (registries.credentialProviderBinDir)", configPath)
	}
	seen := map[string]bool{}
	for i, p := range cfg.Providers {
		where := fmt.Sprintf("credential provider config %s: providers[%d]", configPath, i)
		if err := validate(p, seen); err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		if p.TokenAttributes != nil {
			k.log.Warn("credential provider needs a pod's service account token; pinwarden cannot run it", "provider", p.Name)
			continue
		}
		path := filepath.Join(binDir, p.Name)
		st, err := os.Stat(path)
		if err != nil {
			return nil, fmt.Errorf("%s: plugin %q: %w", where, p.Name, err)
		}
		if st.IsDir() || st.Mode()&0o111 == 0 {
			return nil, fmt.Errorf("%s: plugin %s is not an executable file", where, path)
		}
		env := make([]string, 0, len(p.Env))
		for _, e := range p.Env {
			env = append(env, e.Name+"="+e.Value)
		}
		k.providers = append(k.providers, &provider{
			name: p.Name, path: path, apiVersion: p.APIVersion, matchImages: p.MatchImages,
			defaultTTL: p.DefaultCacheDuration.Duration, args: p.Args, env: env, cache: map[string]entry{},
		})
	}
	return k, nil
}

func readConfig(path string) (*kubeletconfig.CredentialProviderConfig, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("credential provider config: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("credential provider config %s: %w", path, err)
	}
	if len(b) > maxConfigSize {
		return nil, fmt.Errorf("credential provider config %s: larger than %d bytes", path, maxConfigSize)
	}
	var cfg kubeletconfig.CredentialProviderConfig
	if err := yaml.UnmarshalStrict(b, &cfg); err != nil {
		return nil, fmt.Errorf("credential provider config %s: %w", path, err)
	}
	// v1beta1 and v1alpha1 have the same shape as v1; the kubelet still reads them.
	if !strings.HasPrefix(cfg.APIVersion, configGroup) || cfg.Kind != configKind {
		return nil, fmt.Errorf("credential provider config %s: apiVersion %q kind %q, want %sv1 %s", path, cfg.APIVersion, cfg.Kind, configGroup, configKind)
	}
	if len(cfg.Providers) == 0 {
		return nil, fmt.Errorf("credential provider config %s: no providers", path)
	}
	return &cfg, nil
}

func validate(p kubeletconfig.CredentialProvider, seen map[string]bool) error {
	switch {
	case p.Name == "":
		return errors.New("name is required")
	case strings.ContainsAny(p.Name, `/\`) || p.Name == "." || p.Name == "..":
		return fmt.Errorf("name %q must not be a path", p.Name)
	case seen[p.Name]:
		return fmt.Errorf("duplicate provider name %q", p.Name)
	case len(p.MatchImages) == 0:
		return fmt.Errorf("provider %q: matchImages is required", p.Name)
	case p.DefaultCacheDuration == nil:
		return fmt.Errorf("provider %q: defaultCacheDuration is required", p.Name)
	case p.DefaultCacheDuration.Duration < 0:
		return fmt.Errorf("provider %q: defaultCacheDuration must not be negative", p.Name)
	case p.APIVersion != protocolV1 && p.APIVersion != "credentialprovider.kubelet.k8s.io/v1beta1" && p.APIVersion != "credentialprovider.kubelet.k8s.io/v1alpha1":
		return fmt.Errorf("provider %q: unsupported apiVersion %q", p.Name, p.APIVersion)
	}
	seen[p.Name] = true
	for _, m := range p.MatchImages {
		if strings.Contains(m, "://") {
			return fmt.Errorf("provider %q: matchImages entry %q must not have a scheme", p.Name, m)
		}
	}
	return nil
}

// Providers names the plugins that will run, in config order.
func (k *Keychain) Providers() []string {
	out := make([]string, 0, len(k.providers))
	for _, p := range k.providers {
		out = append(out, p.name)
	}
	return out
}

// Resolve implements authn.Keychain with a background context.
func (k *Keychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), r)
}

// ResolveContext implements authn.ContextKeychain: the first provider whose
// matchImages match the resource and whose answer holds credentials for it
// gives them; otherwise Anonymous.
func (k *Keychain) ResolveContext(ctx context.Context, r authn.Resource) (authn.Authenticator, error) {
	ac, ok, err := k.Lookup(ctx, r.String())
	if err != nil || !ok {
		return authn.Anonymous, err
	}
	return authn.FromConfig(ac), nil
}

// Lookup returns the credentials that the providers give image (a
// reference, "host/repo" at least). ok is false when no provider matches.
func (k *Keychain) Lookup(ctx context.Context, image string) (ac authn.AuthConfig, ok bool, err error) {
	var errs []error
	for _, p := range k.providers {
		if !p.matches(image) {
			continue
		}
		auth, err := k.answer(ctx, p, image)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if c, ok := pick(auth, image); ok {
			return authn.AuthConfig{Username: c.Username, Password: c.Password}, true, nil
		}
	}
	return authn.AuthConfig{}, false, errors.Join(errs...)
}

func (p *provider) matches(image string) bool {
	return slices.ContainsFunc(p.matchImages, func(g string) bool { return URLsMatch(g, image) })
}

// pick chooses the auth entry for image the way the kubelet's keyring does:
// keys tried from the most specific (reverse lexical order) to the least.
func pick(auth map[string]credv1.AuthConfig, image string) (credv1.AuthConfig, bool) {
	keys := make([]string, 0, len(auth))
	for key := range auth {
		keys = append(keys, key)
	}
	sort.Sort(sort.Reverse(sort.StringSlice(keys)))
	for _, key := range keys {
		if URLsMatch(key, image) {
			return auth[key], true
		}
	}
	return credv1.AuthConfig{}, false
}

// cacheKeys are the keys a cached answer for image may sit under, one per
// cacheKeyType.
func cacheKeys(image string) map[credv1.PluginCacheKeyType]string {
	return map[credv1.PluginCacheKeyType]string{
		credv1.ImagePluginCacheKeyType:    "image:" + image,
		credv1.RegistryPluginCacheKeyType: "registry:" + registryOf(image),
		credv1.GlobalPluginCacheKeyType:   "global",
	}
}

func registryOf(image string) string {
	host, _, _ := strings.Cut(image, "/")
	return host
}

// answer returns the provider's auth map for image, from the cache or from
// one plugin run shared by concurrent callers.
func (k *Keychain) answer(ctx context.Context, p *provider, image string) (map[string]credv1.AuthConfig, error) {
	keys := cacheKeys(image)
	if auth, ok := p.cached(keys, k.now()); ok {
		return auth, nil
	}
	v, err, _ := p.group.Do(image, func() (any, error) {
		if auth, ok := p.cached(keys, k.now()); ok {
			return auth, nil
		}
		resp, err := k.run(ctx, p, image)
		if err != nil {
			return nil, err
		}
		ttl := p.defaultTTL
		if resp.CacheDuration != nil {
			ttl = resp.CacheDuration.Duration
		}
		if ttl > 0 {
			p.mu.Lock()
			p.cache[keys[resp.CacheKeyType]] = entry{auth: resp.Auth, expires: k.now().Add(ttl)}
			p.mu.Unlock()
		}
		k.log.Debug("credential provider answered", "provider", p.name, "cacheKeyType", string(resp.CacheKeyType), "cacheDuration", ttl, "entries", len(resp.Auth))
		return resp.Auth, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(map[string]credv1.AuthConfig), nil
}

func (p *provider) cached(keys map[credv1.PluginCacheKeyType]string, now time.Time) (map[string]credv1.AuthConfig, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, t := range []credv1.PluginCacheKeyType{credv1.ImagePluginCacheKeyType, credv1.RegistryPluginCacheKeyType, credv1.GlobalPluginCacheKeyType} {
		e, ok := p.cache[keys[t]]
		if !ok {
			continue
		}
		if now.Before(e.expires) {
			return e.auth, true
		}
		delete(p.cache, keys[t])
	}
	return nil, false
}

// response is the wire form of CredentialProviderResponse with TypeMeta spelled out.
type response struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	credv1.CredentialProviderResponse
}

// run executes the plugin once for image.
func (k *Keychain) run(ctx context.Context, p *provider, image string) (*credv1.CredentialProviderResponse, error) {
	req, err := json.Marshal(map[string]string{"apiVersion": p.apiVersion, "kind": requestKind, "image": image})
	if err != nil {
		return nil, fmt.Errorf("credential provider %s: %w", p.name, err)
	}
	ctx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.path, p.args...) //nolint:gosec // the kubelet's configured plugin
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdin = bytes.NewReader(req)
	stdout := &capped{max: maxResponseSize}
	cmd.Stdout = stdout
	cmd.Stderr = io.Discard // plugins may print secrets there; never kept
	cmd.WaitDelay = time.Second
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("credential provider %s: %w", p.name, ctx.Err())
		}
		return nil, fmt.Errorf("credential provider %s: %w", p.name, err)
	}
	if stdout.over {
		return nil, fmt.Errorf("credential provider %s: response larger than %d bytes", p.name, maxResponseSize)
	}
	var resp response
	if err := json.Unmarshal(stdout.buf.Bytes(), &resp); err != nil {
		// encoding/json errors name types and offsets, never the input.
		return nil, fmt.Errorf("credential provider %s: malformed response: %w", p.name, err)
	}
	if resp.Kind != responseKind || resp.APIVersion != p.apiVersion {
		return nil, fmt.Errorf("credential provider %s: response apiVersion %q kind %q, want %q %q", p.name, resp.APIVersion, resp.Kind, p.apiVersion, responseKind)
	}
	switch resp.CacheKeyType {
	case credv1.ImagePluginCacheKeyType, credv1.RegistryPluginCacheKeyType, credv1.GlobalPluginCacheKeyType:
	default:
		return nil, fmt.Errorf("credential provider %s: invalid cacheKeyType %q", p.name, resp.CacheKeyType)
	}
	if resp.CacheDuration != nil && resp.CacheDuration.Duration < 0 {
		return nil, fmt.Errorf("credential provider %s: negative cacheDuration", p.name)
	}
	return &resp.CredentialProviderResponse, nil
}

// capped keeps up to max bytes and notes whether more came.
type capped struct {
	buf  bytes.Buffer
	max  int
	over bool
}

func (c *capped) Write(b []byte) (int, error) {
	if room := c.max - c.buf.Len(); len(b) > room {
		c.over = true
		c.buf.Write(b[:max(room, 0)])
		return len(b), nil
	}
	return c.buf.Write(b)
}
