// Package pullsecrets resolves registry credentials from the
// imagePullSecrets of the pods that run an image, for nodes where the
// kubelet pulls with pod secrets rather than node credentials. It is opt-in
// (registries.podPullSecrets) because it needs `get` on pods and secrets.
//
// Which pods run an image comes from the runtime inventory (a Pods
// function); their pull secrets are read through a small client-go subset.
package pullsecrets

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/pinwarden/pinwarden/agent/registry/credprovider"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// PodRef names one pod.
type PodRef struct{ Namespace, Name string }

// Pods returns the pods on this node that run an image of repository repo
// ("host/path"), from the runtime inventory.
type Pods func(repo string) []PodRef

// API is the subset of the Kubernetes API this package reads.
type API interface {
	PullSecretNames(ctx context.Context, pod PodRef) ([]string, error)
	Secret(ctx context.Context, namespace, name string) (*corev1.Secret, error)
}

// ClientGo implements API with client-go.
type ClientGo struct{ C kubernetes.Interface }

var _ API = ClientGo{}

// PullSecretNames reads the pod's spec.imagePullSecrets.
func (c ClientGo) PullSecretNames(ctx context.Context, p PodRef) ([]string, error) {
	pod, err := c.C.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get pod %s/%s: %w", p.Namespace, p.Name, err)
	}
	out := make([]string, 0, len(pod.Spec.ImagePullSecrets))
	for _, s := range pod.Spec.ImagePullSecrets {
		out = append(out, s.Name)
	}
	return out, nil
}

// Secret reads one secret.
func (c ClientGo) Secret(ctx context.Context, ns, name string) (*corev1.Secret, error) {
	s, err := c.C.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get secret %s/%s: %w", ns, name, err)
	}
	return s, nil
}

// Keychain resolves credentials for a repository from the pull secrets of
// the pods running it. It is safe for concurrent use.
type Keychain struct {
	pods Pods
	api  API
	ttl  time.Duration
	now  func() time.Time

	mu    sync.Mutex // guards cache
	cache map[string]cachedSecret
}

type cachedSecret struct {
	auths   map[string]authn.AuthConfig // registry key -> credentials
	expires time.Time
}

var _ authn.ContextKeychain = (*Keychain)(nil)

// New returns a Keychain; secrets are cached for ttl (0: 1 minute).
func New(pods Pods, api API, ttl time.Duration) *Keychain {
	if ttl <= 0 {
		ttl = time.Minute
	}
	return &Keychain{pods: pods, api: api, ttl: ttl, now: time.Now, cache: map[string]cachedSecret{}}
}

// Resolve implements authn.Keychain with a background context.
func (k *Keychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), r)
}

// ResolveContext implements authn.ContextKeychain: the first pull secret (in
// pod order, then the pod's order) with an entry matching the repository
// gives the credentials, matched the kubelet's way (most specific key first).
func (k *Keychain) ResolveContext(ctx context.Context, r authn.Resource) (authn.Authenticator, error) {
	repo := r.String()
	for _, p := range k.pods(repo) {
		names, err := k.api.PullSecretNames(ctx, p)
		if err != nil {
			return authn.Anonymous, err
		}
		for _, n := range names {
			auths, err := k.secret(ctx, p.Namespace, n)
			if err != nil {
				return authn.Anonymous, err
			}
			if ac, ok := match(auths, repo); ok {
				return authn.FromConfig(ac), nil
			}
		}
	}
	return authn.Anonymous, nil
}

func match(auths map[string]authn.AuthConfig, repo string) (authn.AuthConfig, bool) {
	keys := make([]string, 0, len(auths))
	for key := range auths {
		keys = append(keys, key)
	}
	sort.Sort(sort.Reverse(sort.StringSlice(keys)))
	for _, key := range keys {
		if credprovider.URLsMatch(key, repo) {
			return auths[key], true
		}
	}
	return authn.AuthConfig{}, false
}

func (k *Keychain) secret(ctx context.Context, ns, name string) (map[string]authn.AuthConfig, error) {
	key := ns + "/" + name
	k.mu.Lock()
	c, ok := k.cache[key]
	k.mu.Unlock()
	if ok && k.now().Before(c.expires) {
		return c.auths, nil
	}
	s, err := k.api.Secret(ctx, ns, name)
	if err != nil {
		return nil, err
	}
	auths, err := parseSecret(s)
	if err != nil {
		return nil, fmt.Errorf("pull secret %s: %w", key, err)
	}
	k.mu.Lock()
	k.cache[key] = cachedSecret{auths: auths, expires: k.now().Add(k.ttl)}
	k.mu.Unlock()
	return auths, nil
}

// parseSecret reads a kubernetes.io/dockerconfigjson or kubernetes.io/dockercfg secret.
func parseSecret(s *corev1.Secret) (map[string]authn.AuthConfig, error) {
	type entry struct {
		Auth     string `json:"auth"`
		Username string `json:"username"`
		Password string `json:"password"`
	}
	var entries map[string]entry
	switch s.Type {
	case corev1.SecretTypeDockerConfigJson:
		var cfg struct {
			Auths map[string]entry `json:"auths"`
		}
		if err := json.Unmarshal(s.Data[corev1.DockerConfigJsonKey], &cfg); err != nil {
			return nil, fmt.Errorf("malformed %s: %w", corev1.DockerConfigJsonKey, err)
		}
		entries = cfg.Auths
	case corev1.SecretTypeDockercfg:
		if err := json.Unmarshal(s.Data[corev1.DockerConfigKey], &entries); err != nil {
			return nil, fmt.Errorf("malformed %s: %w", corev1.DockerConfigKey, err)
		}
	default:
		return nil, fmt.Errorf("type %q is not a docker config secret", s.Type)
	}
	out := make(map[string]authn.AuthConfig, len(entries))
	for key, e := range entries {
		ac := authn.AuthConfig{Username: e.Username, Password: e.Password}
		if e.Auth != "" {
			dec, err := base64.StdEncoding.DecodeString(e.Auth)
			if err != nil {
				return nil, fmt.Errorf("entry %q: auth is not base64", key)
			}
			u, p, ok := strings.Cut(string(dec), ":")
			if !ok {
				return nil, fmt.Errorf("entry %q: auth is not user:password", key)
			}
			ac.Username, ac.Password = u, p
		}
		k := key
		if i := strings.Index(k, "://"); i >= 0 {
			k = k[i+3:]
		}
		k = strings.TrimSuffix(strings.TrimSuffix(k, "/v1/"), "/")
		if k == "index.docker.io" || k == "docker.io" {
			k = "index.docker.io"
		}
		out[k] = ac
	}
	return out, nil
}
