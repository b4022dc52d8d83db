package harness

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// PullSecret creates the kubernetes.io/dockerconfigjson Secret ns/name
// holding user and password for registry host, as `kubectl create secret
// docker-registry` does.
func (k *Kube) PullSecret(ns, name, host, user, password string) {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	cfg := fmt.Sprintf(`{"auths":{%q:{"username":%q,"password":%q,"auth":%q}}}`, host, user, password, auth)
	_, err := k.client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Type:       corev1.SecretTypeDockerConfigJson,
		Data:       map[string][]byte{corev1.DockerConfigJsonKey: []byte(cfg)},
	}, metav1.CreateOptions{})
	if err != nil {
		k.t.Fatalf("create pull secret %s/%s: %v", ns, name, err)
	}
}

// Reported returns, as text, what an agent can write to the API server:
// every Event in every namespace (reason, message, note, involved object)
// and every Node's annotations, labels, taints and conditions.
func (k *Kube) Reported(t testing.TB) map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	evs, err := k.client.CoreV1().Events(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list events: %v", err)
	}
	var events strings.Builder
	for _, e := range evs.Items {
		fmt.Fprintf(&events, "%s %s/%s %s %s: %s %v\n", e.Type, e.InvolvedObject.Kind, e.InvolvedObject.Name,
			e.Reason, e.Action, e.Message, e.Annotations)
	}
	nodes, err := k.client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list nodes: %v", err)
	}
	var ns strings.Builder
	for _, n := range nodes.Items {
		fmt.Fprintf(&ns, "%s annotations=%v labels=%v taints=%v\n", n.Name, n.Annotations, n.Labels, n.Spec.Taints)
		for _, c := range n.Status.Conditions {
			fmt.Fprintf(&ns, "  %s=%s %s: %s\n", c.Type, c.Status, c.Reason, c.Message)
		}
	}
	return map[string]string{"events": events.String(), "nodes": ns.String()}
}

// Leaks returns, for each place in texts (name -> content) that holds a
// credential, the place and the form found: user, password and each of more
// as is, and the base64 of each and of user:password (the docker config
// `auth` form).
func Leaks(texts map[string]string, user, password string, more ...string) []string {
	forms := map[string]string{}
	names := []string{"the user name", "the password", "user:password"}
	for i, s := range append([]string{user, password, user + ":" + password}, more...) {
		if s == "" {
			continue
		}
		what := fmt.Sprintf("secret #%d", i-len(names))
		if i < len(names) {
			what = names[i]
		}
		if i != 2 { // user:password appears only encoded
			forms[s] = what
		}
		// Unpadded: a prefix of the padded form, found inside longer base64 too.
		forms[base64.RawStdEncoding.EncodeToString([]byte(s))] = "base64 of " + what
		forms[base64.RawURLEncoding.EncodeToString([]byte(s))] = "base64url of " + what
	}
	var out []string
	for where, text := range texts {
		for form, what := range forms {
			if strings.Contains(text, form) {
				out = append(out, fmt.Sprintf("%s in the %s", what, where))
			}
		}
	}
	return out
}
