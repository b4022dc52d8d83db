// Package nodepull checks that pinwarden fetches signatures the way the node
// pulls images: a real containerd pulls through the same containerd hosts
// dir (private CA, mirror) with the credentials that pinwarden gets from the
// node's credential sources (a kubelet credential provider plugin, as the
// kubelet would hand them to CRI), and pinwarden judges the digest that
// containerd pulled.
package nodepull

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/agent/verify"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
	)
}

const (
	user = "node-user"
	pass = "n0de-s3cret-pass"
)

func policyFor(t *testing.T, s *harness.Signer) *policy.Policy {
	t.Helper()
	cfg, err := config.Parse([]byte(fmt.Sprintf("policies:\n- name: node\n  images: [\"**\"]\n  keys: [%s]\n", s.PubPath)), "")
	if err != nil {
		t.Fatal(err)
	}
	set, err := policy.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return set.Policies[0]
}

// pulledDigest pulls ref through CRI with auth and returns the manifest
// digest containerd recorded for it.
func pulledDigest(t *testing.T, c *cri.Client, ref string, auth *cri.Auth) string {
	t.Helper()
	if _, err := c.PullImage(t.Context(), ref, auth); err != nil {
		t.Fatalf("containerd pull %s: %v", ref, err)
	}
	im, err := c.ImageStatus(t.Context(), ref)
	if err != nil || im == nil {
		t.Fatalf("image status %s: %v", ref, err)
	}
	for _, rd := range im.RepoDigests {
		if _, d, ok := strings.Cut(rd, "@"); ok {
			return d
		}
	}
	t.Fatalf("no repo digest for %s: %+v", ref, im)
	return ""
}

func startNode(t *testing.T) (*harness.Containerd, *cri.Client) {
	t.Helper()
	ctd := harness.StartContainerd(t)
	c, err := cri.Dial(t.Context(), ctd.Endpoint(), "k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return ctd, c
}

// TestNodePullsWithPluginCredentialsOverTLS: registry with htpasswd over TLS
// with a private CA named in hosts.toml; the credentials come from a kubelet
// credential provider plugin.
func TestNodePullsWithPluginCredentialsOverTLS(t *testing.T) {
	ca := harness.NewCA(t)
	d := harness.StartDistributionWith(t, harness.DistributionOptions{TLS: ptr(ca.Issue("registry")), Htpasswd: map[string]string{user: pass}, Seed: true})
	signer := harness.NewSigner(t)
	digest := harness.PushRandomImage(t, d.SeedHost+"/team/app:v1", 1024)
	signer.Sign(t, d.SeedHost+"/team/app", digest)

	ctd, c := startNode(t)
	ctd.WriteHostsTOML(d.Host, fmt.Sprintf("server = \"https://%s\"\n[host.\"https://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = %q\n", d.Host, d.Host, ca.CertPath))

	dir := t.TempDir()
	harness.FakeBinary(t, "credprovider", dir, "node-plugin")
	auth, _ := json.Marshal(map[string]any{d.Host: map[string]string{"username": user, "password": pass}})
	cpc := filepath.Join(dir, "credential-provider.yaml")
	if err := os.WriteFile(cpc, []byte(fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
- name: node-plugin
  matchImages: [%q]
  defaultCacheDuration: 5m
  apiVersion: credentialprovider.kubelet.k8s.io/v1
  env: [{name: FAKE_CP_AUTH, value: %q}]
`, d.Host, auth)), 0o600); err != nil {
		t.Fatal(err)
	}
	v, err := verify.New(verify.Options{Registries: config.Registries{
		CredentialProviderConfig: cpc, CredentialProviderBinDir: dir, ContainerdHostsDir: ctd.HostsDir()}})
	if err != nil {
		t.Fatal(err)
	}
	ac, ok := v.Credentials(d.Host)
	if !ok {
		t.Fatal("no credentials from the plugin")
	}
	// Without credentials the node cannot pull; with the plugin's it can.
	if _, err := c.PullImage(t.Context(), d.Host+"/team/app:v1", nil); err == nil {
		t.Fatal("anonymous pull succeeded")
	}
	pulled := pulledDigest(t, c, d.Host+"/team/app:v1", &cri.Auth{Username: ac.Username, Password: ac.Password})
	if pulled != digest {
		t.Fatalf("containerd pulled %s, pushed %s", pulled, digest)
	}
	res := v.Verify(t.Context(), policyFor(t, signer), d.Host+"/team/app", pulled)
	if res.Verdict != verdict.Verified {
		t.Fatalf("pinwarden: %s/%s: %s", res.Verdict, res.Reason, res.Detail)
	}
}

// TestNodePullsThroughMirror: containerd pulls through a pull-through
// mirror named in hosts.toml; pinwarden reads the same file, verifies via
// the mirror, and still does after the upstream is gone.
func TestNodePullsThroughMirror(t *testing.T) {
	upstream := harness.StartDistributionWith(t, harness.DistributionOptions{})
	signer := harness.NewSigner(t)
	digest := harness.PushRandomImage(t, upstream.Host+"/team/app:v1", 1024)
	// With an annotation, so that pinwarden fetches the signature layer
	// through the mirror (a plain cosign payload is rebuilt, not fetched)
	// and the mirror must keep it.
	signer.SignWith(t, upstream.Host+"/team/app", digest, harness.SignOptions{Annotations: map[string]any{"build": "42"}})
	mirror := harness.StartDistributionWith(t, harness.DistributionOptions{ProxyRemoteURL: "http://" + upstream.Host})

	ctd, c := startNode(t)
	ctd.WriteHostsTOML(upstream.Host, fmt.Sprintf("server = \"https://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", upstream.Host, mirror.Host))
	pulled := pulledDigest(t, c, upstream.Host+"/team/app:v1", nil)
	if pulled != digest {
		t.Fatalf("containerd pulled %s, pushed %s", pulled, digest)
	}
	opts := verify.Options{Registries: config.Registries{ContainerdHostsDir: ctd.HostsDir()}, RetryBackoff: 5 * time.Millisecond}
	v, err := verify.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	p := policyFor(t, signer)
	if res := v.Verify(t.Context(), p, upstream.Host+"/team/app", pulled); res.Verdict != verdict.Verified {
		t.Fatalf("pinwarden via the mirror: %s/%s: %s", res.Verdict, res.Reason, res.Detail)
	}
	// The mirror stores blobs after serving them.
	for _, l := range harness.SignatureLayers(t, upstream.Host+"/team/app", digest) {
		mirror.WaitBlobStored(t, l)
	}
	upstream.Stop()
	v2, err := verify.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if res := v2.Verify(t.Context(), p, upstream.Host+"/team/app", pulled); res.Verdict != verdict.Verified {
		t.Fatalf("pinwarden with the upstream stopped: %s/%s: %s", res.Verdict, res.Reason, res.Detail)
	}
}

func ptr[T any](v T) *T { return &v }
