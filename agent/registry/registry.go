// Package registry composes the node's registry credentials (pod pull
// secrets when opted in, the docker config, the kubelet's credential
// provider plugins) into one go-containerregistry keychain, resolved per
// image repository, and remembers which credentials it handed out for which
// host so that a transport can refuse to send them anywhere else.
package registry

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/registry/credprovider"
	"github.com/pinwarden/pinwarden/agent/registry/dockercfg"
	"github.com/pinwarden/pinwarden/agent/registry/pullsecrets"
)

// Options configure NewKeychain.
type Options struct {
	Registries config.Registries
	// PullSecrets is the pod pull secret keychain; used only with
	// Registries.PodPullSecrets (the agent builds it from the inventory).
	PullSecrets *pullsecrets.Keychain
	// CredentialHelperDir holds docker-credential-* helpers ("": $PATH).
	CredentialHelperDir string
	Logger              *slog.Logger
}

// Keychain is the node's credentials as one keychain. Safe for concurrent use.
type Keychain struct {
	sources []source
	log     *slog.Logger

	mu     sync.Mutex                     // guards issued
	issued map[string]map[[32]byte]string // host -> sha256(Basic header) -> source
}

type source struct {
	name string
	kc   authn.Keychain
}

var _ authn.ContextKeychain = (*Keychain)(nil)

// NewKeychain reads the configured credential sources. Order: pod pull
// secrets (when enabled, as the kubelet puts them first), the docker
// config, the credential provider plugins; the first that has credentials
// for a repository gives them.
func NewKeychain(o Options) (*Keychain, error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	k := &Keychain{log: log, issued: map[string]map[[32]byte]string{}}
	r := o.Registries
	if r.PodPullSecrets && o.PullSecrets != nil {
		k.sources = append(k.sources, source{"pod pull secrets", o.PullSecrets})
	}
	if r.DockerConfig != "" {
		dc, err := dockercfg.New(r.DockerConfig, dockercfg.WithLogger(log), dockercfg.WithHelperDir(o.CredentialHelperDir))
		if err != nil {
			return nil, err
		}
		k.sources = append(k.sources, source{"docker config", dc})
	}
	if r.CredentialProviderConfig != "" {
		cp, err := credprovider.Load(r.CredentialProviderConfig, r.CredentialProviderBinDir, credprovider.WithLogger(log))
		if err != nil {
			return nil, err
		}
		k.sources = append(k.sources, source{"credential provider", cp})
	}
	return k, nil
}

// Resolve implements authn.Keychain with a background context.
func (k *Keychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), r)
}

// ResolveContext implements authn.ContextKeychain. A source that fails is
// skipped; its error is returned only when no other source has credentials.
func (k *Keychain) ResolveContext(ctx context.Context, r authn.Resource) (authn.Authenticator, error) {
	var errs []error
	for _, s := range k.sources {
		a, err := authn.Resolve(ctx, s.kc, r)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.name, err))
			continue
		}
		if a == authn.Anonymous {
			continue
		}
		ac, err := authn.Authorization(ctx, a)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.name, err))
			continue
		}
		if *ac == (authn.AuthConfig{}) {
			continue
		}
		k.remember(r.RegistryStr(), ac, s.name)
		k.log.Debug("registry credentials found", "registry", r.RegistryStr(), "source", s.name)
		return authn.FromConfig(*ac), nil
	}
	return authn.Anonymous, errors.Join(errs...)
}

func (k *Keychain) remember(host string, ac *authn.AuthConfig, src string) {
	if ac.Username == "" && ac.Password == "" {
		return
	}
	h := sha256.Sum256([]byte(basic(ac.Username, ac.Password)))
	hosts := []string{strings.ToLower(host)}
	if hub := dockercfg.DockerHubHosts(); slices.Contains(hub, hosts[0]) {
		hosts = hub // Docker Hub's token service is auth.docker.io
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, host := range hosts {
		if k.issued[host] == nil {
			k.issued[host] = map[[32]byte]string{}
		}
		k.issued[host][h] = src
	}
}

func basic(u, p string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(u+":"+p))
}

// AllowsBasic reports whether the Authorization header h may be sent to
// host: only when this keychain handed out exactly those credentials for
// that host. A token realm on another host never gets them.
func (k *Keychain) AllowsBasic(host, h string) bool {
	sum := sha256.Sum256([]byte(h))
	k.mu.Lock()
	defer k.mu.Unlock()
	_, ok := k.issued[strings.ToLower(host)][sum]
	return ok
}

// Sources names the credential sources in use, in order.
func (k *Keychain) Sources() []string {
	out := make([]string, 0, len(k.sources))
	for _, s := range k.sources {
		out = append(out, s.name)
	}
	return out
}
