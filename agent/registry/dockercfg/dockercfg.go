// Package dockercfg resolves registry credentials from one docker
// config.json the way the docker CLI does: credHelpers for the host first,
// then credsStore, then the static auths. Helpers (docker-credential-NAME)
// run through github.com/docker/docker-credential-helpers/client. The file
// is re-read when it changes on disk (a stat per lookup), so rotated
// credentials are used without a restart.
//
// Credentials are secrets: nothing here logs them or puts them in an error.
package dockercfg

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/docker/docker-credential-helpers/client"
	"github.com/docker/docker-credential-helpers/credentials"
	"github.com/google/go-containerregistry/pkg/authn"
)

const (
	maxConfigSize = 1 << 20
	// dockerHubKey is the docker CLI's config key for Docker Hub.
	dockerHubKey = "https://index.docker.io/v1/"
	// tokenUsername marks a helper answer whose secret is an identity token.
	tokenUsername = "<token>"
)

// dockerHubHosts are the hosts Docker Hub's credentials belong to (the
// registry and its token service).
var dockerHubHosts = []string{"index.docker.io", "registry-1.docker.io", "docker.io", "auth.docker.io"}

// DockerHubHosts returns the hosts Docker Hub's credentials belong to (the
// registry's names and its token service).
func DockerHubHosts() []string { return slices.Clone(dockerHubHosts) }

// Option configures a Keychain.
type Option func(*Keychain)

// WithHelperDir looks helpers up in dir instead of $PATH.
func WithHelperDir(dir string) Option { return func(k *Keychain) { k.helperDir = dir } }

// WithHelperCacheTTL keeps helper answers this long (default 1m; 0 or
// negative: ask the helper every time).
func WithHelperCacheTTL(d time.Duration) Option { return func(k *Keychain) { k.helperTTL = d } }

// WithHelperTimeout bounds one helper run (default 30s).
func WithHelperTimeout(d time.Duration) Option { return func(k *Keychain) { k.helperTimeout = d } }

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(k *Keychain) { k.log = l } }

// WithClock replaces time.Now (tests).
func WithClock(now func() time.Time) Option { return func(k *Keychain) { k.now = now } }

// Keychain resolves credentials from one docker config file. It is safe for
// concurrent use.
type Keychain struct {
	path          string
	helperDir     string
	helperTTL     time.Duration
	helperTimeout time.Duration
	now           func() time.Time
	log           *slog.Logger

	mu      sync.Mutex // guards cfg, stamp and helperCache
	cfg     *fileConfig
	stamp   fileStamp
	helpers map[string]helperAnswer // helper+server -> answer
}

var _ authn.ContextKeychain = (*Keychain)(nil)

// fileConfig is what a docker config file says about credentials.
type fileConfig struct {
	auths       map[string]authn.AuthConfig // canonical host -> static credentials
	credHelpers map[string]string           // canonical host -> helper name
	credsStore  string
}

// fileStamp identifies one version of the file on disk.
type fileStamp struct {
	ino   uint64
	size  int64
	mtime time.Time
}

type helperAnswer struct {
	ac      authn.AuthConfig
	found   bool
	expires time.Time
}

// New reads the docker config at path. An empty path gives a keychain that
// always answers Anonymous.
func New(path string, opts ...Option) (*Keychain, error) {
	k := &Keychain{path: path, helperTTL: time.Minute, helperTimeout: 30 * time.Second, now: time.Now,
		log: slog.New(slog.DiscardHandler), helpers: map[string]helperAnswer{}}
	for _, o := range opts {
		o(k)
	}
	if path == "" {
		k.cfg = &fileConfig{}
		return k, nil
	}
	if err := k.Reload(); err != nil {
		return nil, err
	}
	return k, nil
}

// Reload re-reads the file now. On error the previous contents stay in force.
func (k *Keychain) Reload() error {
	if k.path == "" {
		return nil
	}
	cfg, stamp, err := readFile(k.path)
	if err != nil {
		return err
	}
	k.mu.Lock()
	k.cfg, k.stamp = cfg, stamp
	clear(k.helpers)
	k.mu.Unlock()
	return nil
}

// refresh reloads the file when its stamp changed since the last read.
func (k *Keychain) refresh() {
	if k.path == "" {
		return
	}
	st, err := stampOf(k.path)
	k.mu.Lock()
	same := err == nil && st == k.stamp
	k.mu.Unlock()
	if same {
		return
	}
	if err := k.Reload(); err != nil {
		// A file being rewritten or removed: keep the last good one.
		k.log.Warn("docker config unreadable, keeping the previous one", "path", k.path, "err", err)
	}
}

func stampOf(path string) (fileStamp, error) {
	st, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	var ino uint64
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		ino = sys.Ino
	}
	return fileStamp{ino: ino, size: st.Size(), mtime: st.ModTime()}, nil
}

func readFile(path string) (*fileConfig, fileStamp, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("docker config: %w", err)
	}
	defer f.Close()
	stamp, err := stampOf(path)
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("docker config: %w", err)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("docker config %s: %w", path, err)
	}
	if len(b) > maxConfigSize {
		return nil, fileStamp{}, fmt.Errorf("docker config %s: larger than %d bytes", path, maxConfigSize)
	}
	cfg, err := parse(b)
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("docker config %s: %w", path, err)
	}
	return cfg, stamp, nil
}

func parse(b []byte) (*fileConfig, error) {
	var raw struct {
		Auths map[string]struct {
			Auth          string `json:"auth"`
			Username      string `json:"username"`
			Password      string `json:"password"`
			IdentityToken string `json:"identitytoken"`
			RegistryToken string `json:"registrytoken"`
		} `json:"auths"`
		CredHelpers map[string]string `json:"credHelpers"`
		CredsStore  string            `json:"credsStore"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		// encoding/json errors never quote the input, so no secret leaks here.
		return nil, err
	}
	cfg := &fileConfig{auths: map[string]authn.AuthConfig{}, credHelpers: map[string]string{}, credsStore: raw.CredsStore}
	if err := checkHelperName(raw.CredsStore); err != nil {
		return nil, fmt.Errorf("credsStore: %w", err)
	}
	for key, a := range raw.Auths {
		ac := authn.AuthConfig{Username: a.Username, Password: a.Password, IdentityToken: a.IdentityToken, RegistryToken: a.RegistryToken}
		if a.Auth != "" {
			dec, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return nil, fmt.Errorf("auths[%q].auth is not base64", key)
			}
			u, p, ok := strings.Cut(string(dec), ":")
			if !ok {
				return nil, fmt.Errorf("auths[%q].auth is not user:password", key)
			}
			ac.Username, ac.Password = u, p
		}
		for _, h := range hostsOf(key) {
			cfg.auths[h] = ac
		}
	}
	for key, helper := range raw.CredHelpers {
		if err := checkHelperName(helper); err != nil {
			return nil, fmt.Errorf("credHelpers[%q]: %w", key, err)
		}
		for _, h := range hostsOf(key) {
			cfg.credHelpers[h] = helper
		}
	}
	return cfg, nil
}

// checkHelperName refuses helper names that would name another program.
func checkHelperName(n string) error {
	if strings.ContainsAny(n, `/\ `) || n == "." || n == ".." {
		return fmt.Errorf("helper name %q is not a plain name", n)
	}
	return nil
}

// hostsOf turns a config key ("https://host:port/v1/" or "host:port") into
// the canonical hosts it covers.
func hostsOf(key string) []string {
	k := key
	if i := strings.Index(k, "://"); i >= 0 {
		k = k[i+3:]
	}
	if i := strings.Index(k, "/"); i >= 0 {
		k = k[:i]
	}
	k = strings.ToLower(k)
	if k == "index.docker.io" || k == "docker.io" || k == "registry-1.docker.io" {
		return dockerHubHosts
	}
	return []string{k}
}

// serverURL is what the docker CLI hands a helper for host.
func serverURL(host string) string {
	for _, h := range dockerHubHosts {
		if h == host {
			return dockerHubKey
		}
	}
	return host
}

// Resolve implements authn.Keychain with a background context.
func (k *Keychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), r)
}

// ResolveContext implements authn.ContextKeychain, by registry host.
func (k *Keychain) ResolveContext(ctx context.Context, r authn.Resource) (authn.Authenticator, error) {
	ac, ok, err := k.Lookup(ctx, r.RegistryStr())
	if err != nil || !ok {
		return authn.Anonymous, err
	}
	return authn.FromConfig(ac), nil
}

// Lookup returns the credentials for registry host (host or host:port):
// from its credHelpers entry, else from credsStore, else from auths, the
// order of the docker CLI. ok is false when there are none.
func (k *Keychain) Lookup(ctx context.Context, host string) (authn.AuthConfig, bool, error) {
	host = strings.ToLower(host)
	k.refresh()
	k.mu.Lock()
	cfg := k.cfg
	k.mu.Unlock()
	helper := cfg.credHelpers[host]
	if helper == "" {
		helper = cfg.credsStore
	}
	if helper != "" {
		ac, found, err := k.fromHelper(ctx, helper, host)
		if err != nil {
			return authn.AuthConfig{}, false, err
		}
		if found {
			return ac, true, nil
		}
	}
	ac, ok := cfg.auths[host]
	return ac, ok, nil
}

// fromHelper asks docker-credential-<helper> for host, through a short cache.
func (k *Keychain) fromHelper(ctx context.Context, helper, host string) (authn.AuthConfig, bool, error) {
	key := helper + "\x00" + host
	now := k.now()
	k.mu.Lock()
	a, ok := k.helpers[key]
	k.mu.Unlock()
	if ok && now.Before(a.expires) {
		return a.ac, a.found, nil
	}
	prog := "docker-credential-" + helper
	if k.helperDir != "" {
		prog = filepath.Join(k.helperDir, prog)
	}
	if _, err := exec.LookPath(prog); err != nil {
		return authn.AuthConfig{}, false, fmt.Errorf("credential helper for %s: %w", host, err)
	}
	ctx, cancel := context.WithTimeout(ctx, k.helperTimeout)
	defer cancel()
	creds, err := client.Get(programFunc(ctx, prog), serverURL(host))
	var ans helperAnswer
	switch {
	case credentials.IsErrCredentialsNotFound(err):
	case err != nil:
		// client.Get quotes the helper's output in its error: never pass it on.
		return authn.AuthConfig{}, false, fmt.Errorf("credential helper %s for %s failed: %w", prog, host, sanitize(ctx, err))
	case creds.Username == tokenUsername:
		ans = helperAnswer{ac: authn.AuthConfig{IdentityToken: creds.Secret}, found: true}
	default:
		ans = helperAnswer{ac: authn.AuthConfig{Username: creds.Username, Password: creds.Secret}, found: true}
	}
	if k.helperTTL > 0 {
		ans.expires = now.Add(k.helperTTL)
		k.mu.Lock()
		k.helpers[key] = ans
		k.mu.Unlock()
	}
	return ans.ac, ans.found, nil
}

// errHelper stands for a helper failure whose text is withheld.
var errHelper = errors.New("helper exited with an error (its output is not shown: it may hold secrets)")

func sanitize(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var ee *exec.Error
	if errors.As(err, &ee) {
		return ee // program not found: names the program only
	}
	return errHelper
}

// program is a client.Program that runs under a context and drops stderr.
type program struct {
	cmd *exec.Cmd
}

func programFunc(ctx context.Context, path string) client.ProgramFunc {
	return func(args ...string) client.Program {
		cmd := exec.CommandContext(ctx, path, args...) // the helper the docker config names
		cmd.Stderr = nil
		cmd.WaitDelay = time.Second
		return &program{cmd: cmd}
	}
}

func (p *program) Output() ([]byte, error) {
	var out bytes.Buffer
	p.cmd.Stdout = &limited{w: &out, left: maxConfigSize}
	err := p.cmd.Run()
	return out.Bytes(), err
}

func (p *program) Input(in io.Reader) { p.cmd.Stdin = in }

// limited drops writes past left bytes.
type limited struct {
	w    io.Writer
	left int
}

func (l *limited) Write(b []byte) (int, error) {
	n := len(b)
	if len(b) > l.left {
		b = b[:l.left]
	}
	l.left -= len(b)
	_, err := l.w.Write(b)
	return n, err
}
