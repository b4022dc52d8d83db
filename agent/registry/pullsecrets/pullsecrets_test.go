package pullsecrets_test

import (
	"context"
	"encoding/base64"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/pinwarden/pinwarden/agent/registry/pullsecrets"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func TestResolveFromPodPullSecrets(t *testing.T) {
	t.Parallel()
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	cs := fake.NewClientset(
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "api-1"},
			Spec: corev1.PodSpec{ImagePullSecrets: []corev1.LocalObjectReference{{Name: "other"}, {Name: "regcred"}}}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "other"}, Type: corev1.SecretTypeDockerConfigJson,
			Data: map[string][]byte{corev1.DockerConfigJsonKey: []byte(`{"auths":{"elsewhere.test":{"auth":"` + b64("x:y") + `"}}}`)}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "regcred"}, Type: corev1.SecretTypeDockerConfigJson,
			Data: map[string][]byte{corev1.DockerConfigJsonKey: []byte(`{"auths":{"https://registry.test:5000":{"auth":"` + b64("shop:pod-secret") + `"},"registry.test:5000/special":{"username":"special","password":"p"}}}`)}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "opaque"}, Type: corev1.SecretTypeOpaque},
	)
	pods := func(repo string) []pullsecrets.PodRef {
		if repo == "registry.test:5000/shop/api" || repo == "registry.test:5000/special/app" {
			return []pullsecrets.PodRef{{Namespace: "shop", Name: "api-1"}}
		}
		return nil
	}
	kc := pullsecrets.New(pods, pullsecrets.ClientGo{C: cs}, 0)
	tests := []struct {
		repo, wantUser, wantPass string
	}{
		{"registry.test:5000/shop/api", "shop", "pod-secret"},
		{"registry.test:5000/special/app", "special", "p"},
		{"registry.test:5000/nobody/runs-this", "", ""},
	}
	for _, tt := range tests {
		r, err := name.NewRepository(tt.repo)
		if err != nil {
			t.Fatal(err)
		}
		a, err := authn.Resolve(t.Context(), kc, r)
		if err != nil {
			t.Fatal(err)
		}
		ac, err := a.Authorization()
		if err != nil {
			t.Fatal(err)
		}
		if ac.Username != tt.wantUser || ac.Password != tt.wantPass {
			t.Errorf("%s: got %q/%q", tt.repo, ac.Username, ac.Password)
		}
	}
	// A secret of the wrong type is an error, not silently anonymous.
	bad := pullsecrets.New(func(string) []pullsecrets.PodRef { return []pullsecrets.PodRef{{Namespace: "shop", Name: "api-2"}} },
		stubAPI{names: []string{"opaque"}, ClientGo: pullsecrets.ClientGo{C: cs}}, 0)
	r, _ := name.NewRepository("registry.test:5000/shop/api")
	if _, err := authn.Resolve(t.Context(), bad, r); err == nil {
		t.Fatal("opaque secret accepted")
	}
}

type stubAPI struct {
	names []string
	pullsecrets.ClientGo
}

func (s stubAPI) PullSecretNames(_ context.Context, _ pullsecrets.PodRef) ([]string, error) {
	return s.names, nil
}
