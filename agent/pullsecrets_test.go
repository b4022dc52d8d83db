package agent

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/registry/pullsecrets"
)

type fixedView []inventory.Image

func (v fixedView) View() []inventory.Image { return v }

func TestPodsRunning(t *testing.T) {
	t.Parallel()
	ctr := func(ns, pod string) inventory.ContainerRef {
		return inventory.ContainerRef{ID: ns + pod, PodNamespace: ns, PodName: pod}
	}
	view := fixedView{
		{Digest: "sha256:1", Repos: []string{"registry.test:5000/shop/api"},
			Containers: []inventory.ContainerRef{ctr("shop", "api-1"), ctr("shop", "api-0"), ctr("shop", "api-1")}},
		{Digest: "sha256:2", Repos: []string{"registry.test:5000/shop/api", "registry.test:5000/shop/alias"},
			Containers: []inventory.ContainerRef{ctr("batch", "job-0"), {ID: "no-pod"}}},
		{Digest: "sha256:3", Repos: []string{"registry.test:5000/shop/pulled-only"}},
		{Digest: "sha256:4", Repos: []string{"docker.io/library/nginx"}, Containers: []inventory.ContainerRef{ctr("web", "nginx-0")}},
	}
	pods := podsRunning(view)
	ref := func(ns, name string) pullsecrets.PodRef { return pullsecrets.PodRef{Namespace: ns, Name: name} }
	tests := []struct {
		repo string
		want []pullsecrets.PodRef
	}{
		{"registry.test:5000/shop/api", []pullsecrets.PodRef{ref("batch", "job-0"), ref("shop", "api-0"), ref("shop", "api-1")}},
		{"registry.test:5000/shop/alias", []pullsecrets.PodRef{ref("batch", "job-0")}},
		{"registry.test:5000/shop/pulled-only", nil},
		{"registry.test:5000/shop", nil},
		{"other.test/shop/api", nil},
		{"index.docker.io/library/nginx", []pullsecrets.PodRef{ref("web", "nginx-0")}},
	}
	for _, tt := range tests {
		if got := pods(tt.repo); !slices.Equal(got, tt.want) {
			t.Errorf("pods(%q) = %v, want %v", tt.repo, got, tt.want)
		}
	}
}

// TestPullSecretsKeychain: the agent's keychain finds the pull secret of
// the pod that runs the image (through a client-go clientset), a pod that
// is gone gives no credentials, and an RBAC refusal is an error (pending,
// never anonymous success) that the log names once as forbidden, without
// the secret's data.
func TestPullSecretsKeychain(t *testing.T) {
	t.Parallel()
	const user, pass = "pod-user", "p0d-s3cret"
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	cs := fake.NewClientset(
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "api-0"},
			Spec: corev1.PodSpec{ImagePullSecrets: []corev1.LocalObjectReference{{Name: "regcred"}}}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "regcred"}, Type: corev1.SecretTypeDockerConfigJson,
			Data: map[string][]byte{corev1.DockerConfigJsonKey: []byte(`{"auths":{"registry.test:5000":{"auth":"` + auth + `"}}}`)}},
	)
	view := fixedView{
		{Digest: "sha256:1", Repos: []string{"registry.test:5000/shop/api"},
			Containers: []inventory.ContainerRef{{ID: "c", PodNamespace: "shop", PodName: "api-0"}}},
		{Digest: "sha256:2", Repos: []string{"registry.test:5000/shop/gone"},
			Containers: []inventory.ContainerRef{{ID: "d", PodNamespace: "shop", PodName: "gone-0"}}},
		{Digest: "sha256:3", Repos: []string{"registry.test:5000/locked/app"},
			Containers: []inventory.ContainerRef{{ID: "e", PodNamespace: "locked", PodName: "app-0"}}},
	}
	cs.PrependReactor("get", "pods", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetNamespace() != "locked" {
			return false, nil, nil
		}
		return true, nil, apierrors.NewForbidden(corev1.Resource("pods"), "app-0", nil)
	})
	var log bytes.Buffer
	kc := newPullSecrets(cs, view, slog.New(slog.NewTextHandler(&log, nil)))
	resolve := func(repo string) (authn.AuthConfig, error) {
		r, err := name.NewRepository(repo)
		if err != nil {
			t.Fatal(err)
		}
		a, err := authn.Resolve(context.Background(), kc, r)
		if err != nil {
			return authn.AuthConfig{}, err
		}
		ac, err := a.Authorization()
		if err != nil {
			t.Fatal(err)
		}
		return *ac, nil
	}
	if ac, err := resolve("registry.test:5000/shop/api"); err != nil || ac.Username != user || ac.Password != pass {
		t.Errorf("running image: %q, %v; want the pod's pull secret", ac.Username, err)
	}
	if ac, err := resolve("registry.test:5000/shop/gone"); err != nil || ac != (authn.AuthConfig{}) {
		t.Errorf("pod gone from the API server: %q, %v; want anonymous, no error", ac.Username, err)
	}
	for range 2 {
		if _, err := resolve("registry.test:5000/locked/app"); err == nil || !apierrors.IsForbidden(err) {
			t.Errorf("RBAC refusal: %v, want a forbidden error", err)
		}
	}
	if n := strings.Count(log.String(), "forbidden"); n < 1 || strings.Count(log.String(), "level=WARN") != 1 {
		t.Errorf("want one Warn naming forbidden, got:\n%s", log.String())
	}
	for _, secret := range []string{pass, auth} {
		if strings.Contains(log.String(), secret) {
			t.Errorf("credential in the log:\n%s", log.String())
		}
	}
}

// TestRunRefusesPodPullSecretsWithoutKubernetes: the agent does not start
// (a config error, exit 2) when pod pull secrets are on and Kubernetes off.
func TestRunRefusesPodPullSecretsWithoutKubernetes(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	y := "stateDir: " + filepath.Join(dir, "state") + "\nregistries: {podPullSecrets: true}\nkubernetes: {enabled: false}\n"
	if err := os.WriteFile(path, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	err := Run(t.Context(), path, "test", slog.New(slog.DiscardHandler))
	var ce ConfigError
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "registries.podPullSecrets: needs kubernetes.enabled: true") {
		t.Fatalf("Run = %v, want a ConfigError naming registries.podPullSecrets", err)
	}
}
