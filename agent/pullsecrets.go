package agent

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/kubernetes"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/registry/pullsecrets"
)

// pullSecretsTTL is how long a pod's pull secret is kept before it is read
// again (a rotated secret is picked up within it).
const pullSecretsTTL = time.Minute

// imageView is the part of the inventory that tells which pods run what.
type imageView interface{ View() []inventory.Image }

// newPullSecrets returns the pod pull secret keychain over the agent's
// Kubernetes client: the pods come from the runtime inventory, their
// imagePullSecrets from the API server. It is built whenever Kubernetes is
// on (cheap, no request until used); the verifier uses it only with
// registries.podPullSecrets.
func newPullSecrets(cs kubernetes.Interface, inv imageView, logger *slog.Logger) *pullsecrets.Keychain {
	api := &refusals{API: pullsecrets.ClientGo{C: cs}, log: logger}
	return pullsecrets.New(podsRunning(inv), api, pullSecretsTTL)
}

// podsRunning answers which pods on this node have a running container of
// an image in repo (as the keychain names it: "host/path", Docker Hub as
// index.docker.io), sorted, each once.
func podsRunning(inv imageView) pullsecrets.Pods {
	return func(repo string) []pullsecrets.PodRef {
		repo = inventoryRepo(repo)
		var out []pullsecrets.PodRef
		for _, img := range inv.View() {
			if len(img.Containers) == 0 || !slices.Contains(img.Repos, repo) {
				continue
			}
			for _, c := range img.Containers {
				if c.PodName != "" && c.PodNamespace != "" {
					out = append(out, pullsecrets.PodRef{Namespace: c.PodNamespace, Name: c.PodName})
				}
			}
		}
		slices.SortFunc(out, func(a, b pullsecrets.PodRef) int {
			return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
		})
		return slices.Compact(out)
	}
}

// inventoryRepo turns a go-containerregistry repository name into the
// inventory's normalized form (docker.io/library/nginx).
func inventoryRepo(repo string) string {
	for _, hub := range []string{"index.docker.io/", "registry-1.docker.io/"} {
		if rest, ok := strings.CutPrefix(repo, hub); ok {
			return "docker.io/" + rest
		}
	}
	return repo
}

// refusals logs the API server's refusals of pod and secret reads at Warn
// (a missing ClusterRole must be visible, not only a pending verdict), each
// distinct message once in a row. Its errors name objects, never their data.
type refusals struct {
	pullsecrets.API
	log *slog.Logger

	mu   sync.Mutex // guards last
	last string
}

// PullSecretNames implements pullsecrets.API. A pod that is gone has no
// pull secrets.
func (r *refusals) PullSecretNames(ctx context.Context, p pullsecrets.PodRef) ([]string, error) {
	names, err := r.API.PullSecretNames(ctx, p)
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	r.note(err)
	return names, err
}

// Secret implements pullsecrets.API.
func (r *refusals) Secret(ctx context.Context, ns, name string) (*corev1.Secret, error) {
	s, err := r.API.Secret(ctx, ns, name)
	r.note(err)
	return s, err
}

func (r *refusals) note(err error) {
	if err == nil {
		return
	}
	msg := err.Error()
	r.mu.Lock()
	repeat := msg == r.last
	r.last = msg
	r.mu.Unlock()
	if repeat {
		return
	}
	if apierrors.IsForbidden(err) {
		r.log.Warn("pod pull secrets: forbidden by the API server; images that need them stay pending "+
			"(deploy/kubernetes/components/pullsecrets grants get on pods and secrets)", "err", msg)
		return
	}
	r.log.Warn("pod pull secrets: reading from the API server failed; images that need them stay pending", "err", msg)
}
