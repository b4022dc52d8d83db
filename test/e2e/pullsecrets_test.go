package e2e

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// PullSecretsManifest is the RBAC of components/pullsecrets.
const PullSecretsManifest = "deploy/kubernetes/components/pullsecrets/clusterrole.yaml"

// TestPodPullSecretsOnRealAPIServer: registries.podPullSecrets with the
// agent binary on the install's ServiceAccount token against a real API
// server, a real containerd and distribution with htpasswd over TLS. An
// image pulled before any pod runs it is pending (no credentials yet).
// Without the component's ClusterRole it stays pending once a pod with an
// imagePullSecret runs it, and the log says forbidden; with the role a
// container start verifies it. No credential shows in the log, /metrics,
// the status API, the events or the Node.
func TestPodPullSecretsOnRealAPIServer(t *testing.T) {
	const user, pass = "pod-user", "p0d-s3cret-pass"
	pause := harness.PauseBinary(t)
	c := startCluster(t) // base and quarantine roles, not the pull secrets one
	node := "node-pullsecrets"
	k := newKubeEnv(t, c, harness.Containerd2, pause, node)
	ca := harness.NewCA(t)
	issued := ca.Issue("registry")
	d := harness.StartDistributionWith(t, harness.DistributionOptions{TLS: &issued, Htpasswd: map[string]string{user: pass}, Seed: true})
	k.ctr.WriteHostsTOML(d.Host, fmt.Sprintf("server = \"https://%s\"\nca = %q\n", d.Host, ca.CertPath))
	push := func(repoTag string, s *harness.Signer) (ref, digest string) {
		digest = harness.PushRunnableImage(t, d.SeedHost+"/"+repoTag, pause)
		repo, _, _ := strings.Cut(repoTag, ":")
		if s != nil {
			s.Sign(t, d.SeedHost+"/"+repo, digest)
		}
		return d.Host + "/" + repoTag, digest
	}
	private, privateD := push("shop/private:v1", k.signer)
	unsigned, unsignedD := push("shop/unsigned:v1", nil)
	const shop = "shop"
	c.Namespace(shop)
	c.PullSecret(shop, "regcred", d.Host, user, pass)

	cfg := k.newConfig(keyPolicy("shop", d.Host+"/shop/**", k.signer),
		harness.KeyPolicy("pause", k.reg.Host+"/pinwarden-test/pause"))
	cfg.Policies[1].Ignore, cfg.Policies[1].Keys = true, nil
	cfg.Registries.PodPullSecrets = true
	cfg.Registries.ContainerdHostsDir = k.ctr.HostsDir()
	k.withKubernetes(cfg, c.kubeconfig, false)
	k.writeConfig(cfg)
	a := k.startAgent(cfg)

	// Pulled (with the pod's credentials, as the kubelet does) before any
	// container of it runs: no pod, no pull secret, no verdict yet.
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	if _, err := k.rt.PullImage(ctx, private, &cri.Auth{Username: user, Password: pass}); err != nil {
		t.Fatal(err)
	}
	if im := a.WaitVerdict(privateD, 30*time.Second); im.Verdict != verdict.Pending || im.Reason != verdict.ReasonRegistryError {
		t.Fatalf("pulled, no pod runs it: %s/%s, want pending/registry-error", im.Verdict, im.Reason)
	}

	// A pod runs it, but the agent may not read pods and secrets.
	k.pods.RunPod(ctx, private, shop, "private-0", harness.WithPullSecret("regcred", user, pass))
	harness.Eventually(t, 30*time.Second, "the log says forbidden", func() (bool, string) {
		return strings.Contains(a.Log(), "pod pull secrets: forbidden by the API server"), "not yet"
	})
	if im := a.Images()[privateD]; im.Verdict != verdict.Pending {
		t.Fatalf("without get pods/secrets: %s/%s, want pending", im.Verdict, im.Reason)
	}

	// The component's ClusterRole: the next container start verifies it.
	manifest, err := os.ReadFile(filepath.Join(repoRoot(t), PullSecretsManifest))
	if err != nil {
		t.Fatal(err)
	}
	c.Apply(manifest, "-n", saNamespace)
	for _, res := range []string{"pods", "secrets"} { // RBAC's authorizer caches: wait until it grants
		harness.Eventually(t, 30*time.Second, "get "+res+" granted", func() (bool, string) {
			out, _ := c.Kubectl(nil, "auth", "can-i", "get", res, "-n", shop, "--as", "system:serviceaccount:"+saNamespace+":"+saName)
			return strings.TrimSpace(out) == "yes", out
		})
	}
	k.pods.RunPod(ctx, private, shop, "private-1", harness.WithPullSecret("regcred", user, pass))
	harness.Eventually(t, 60*time.Second, "verified with the pod's pull secret", func() (bool, string) {
		im := a.Images()[privateD]
		return im.Verdict == verdict.Verified, fmt.Sprintf("%s/%s", im.Verdict, im.Reason)
	})
	// An unsigned image behind the same secret is judged (not pending) and
	// reported on the Node and the Pod.
	k.pods.RunPod(ctx, unsigned, shop, "unsigned-0", harness.WithPullSecret("regcred", user, pass))
	harness.Eventually(t, 60*time.Second, "unsigned image unverified/no-signature, with events", func() (bool, string) {
		im := a.Images()[unsignedD]
		_, n := c.events(t, "Pod", shop, "unsigned-0", verdict.EventImageUnverified)
		return im.Verdict == verdict.Unverified && im.Reason == verdict.ReasonNoSignature && n == 1,
			fmt.Sprintf("%s/%s, %d pod events", im.Verdict, im.Reason, n)
	})

	texts := a.Outputs()
	maps.Copy(texts, c.Reported(t))
	if leaks := harness.Leaks(texts, user, pass); len(leaks) > 0 {
		t.Errorf("credentials shown: %v\n%v", leaks, texts)
	}
	stop(t, a)
}
