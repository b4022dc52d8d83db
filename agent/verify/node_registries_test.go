package verify

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/test/harness"
)

// Tests against real distribution registries with the node's credentials,
// containerd's hosts dir (CA, mirrors) and real cosign signatures.

const (
	nodeUser = "node-user"
	nodePass = "n0de-s3cret-pass-4711"
)

func writeTestFile(t *testing.T, p, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

// nodeCredentials returns Options, one per kind of node credential, each
// giving nodeUser/nodePass for host.
func nodeCredentials(t *testing.T, host string) map[string]Options {
	t.Helper()
	c := harness.WriteNodeCredentials(t, host, nodeUser, nodePass)
	return map[string]Options{
		"docker config auths":         {Registries: config.Registries{DockerConfig: c.DockerConfig}},
		"docker credential helper":    {Registries: config.Registries{DockerConfig: c.HelperConfig}, CredentialHelperDir: c.HelperDir},
		"kubelet credential provider": {Registries: config.Registries{CredentialProviderConfig: c.ProviderConfig, CredentialProviderBinDir: c.ProviderBinDir}},
	}
}

// certsD writes containerd's hosts dir with hosts.toml for host.
func certsD(t *testing.T, host, body string) string {
	t.Helper()
	root := t.TempDir()
	h, port, _ := strings.Cut(host, ":")
	writeTestFile(t, filepath.Join(root, h+"_"+port+"_", "hosts.toml"), body)
	return root
}

func signerPolicy(t *testing.T, s *harness.Signer) *policy.Policy {
	t.Helper()
	return policyFor(t, fmt.Sprintf("policies:\n- name: test\n  images: [\"**\"]\n  keys: [%s]\n", s.PubPath))
}

// debugLogger logs at debug level into b.
func debugLogger(b *harness.LockedBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func TestVerifyWithNodeCredentialsOverTLS(t *testing.T) {
	t.Parallel()
	ca := harness.NewCA(t)
	d := harness.StartDistributionWith(t, harness.DistributionOptions{TLS: ptrTo(ca.Issue("registry")), Htpasswd: map[string]string{nodeUser: nodePass}, Seed: true})
	signer := harness.NewSigner(t)
	digest := harness.PushRandomImage(t, d.SeedHost+"/team/app:v1", 512)
	signer.Sign(t, d.SeedHost+"/team/app", digest)
	unsigned := harness.PushRandomImage(t, d.SeedHost+"/team/app:v2", 512)
	hostsDir := certsD(t, d.Host, fmt.Sprintf("server = \"https://%s\"\nca = %q\n", d.Host, ca.CertPath))
	p := signerPolicy(t, signer)

	for kind, o := range nodeCredentials(t, d.Host) {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			var logs harness.LockedBuffer
			o.Registries.ContainerdHostsDir = hostsDir
			o.Logger = debugLogger(&logs)
			o.RetryBackoff = 5 * time.Millisecond
			v, err := New(o)
			if err != nil {
				t.Fatal(err)
			}
			res := v.Verify(t.Context(), p, d.Host+"/team/app", digest)
			if res.Verdict != verdict.Verified {
				t.Fatalf("verdict %s/%s: %s", res.Verdict, res.Reason, res.Detail)
			}
			res2 := v.Verify(t.Context(), p, d.Host+"/team/app", unsigned)
			if res2.Verdict != verdict.Unverified || res2.Reason != verdict.ReasonNoSignature {
				t.Fatalf("unsigned: %s/%s: %s", res2.Verdict, res2.Reason, res2.Detail)
			}
			// What prefetch hands to CRI for the same host.
			if ac, ok := v.Credentials(d.Host); !ok || ac.Username != nodeUser || ac.Password != nodePass {
				t.Fatalf("Credentials(%s) = ok %v", d.Host, ok)
			}
			// No credential in the log or the results.
			out, _ := json.Marshal([]verdict.Result{res, res2})
			for _, leak := range []string{nodePass, base64.StdEncoding.EncodeToString([]byte(nodeUser + ":" + nodePass))} {
				if strings.Contains(logs.String(), leak) || strings.Contains(string(out), leak) {
					t.Fatalf("credential leaked:\nlog: %s\nresults: %s", logs.String(), out)
				}
			}
		})
	}
	t.Run("without credentials", func(t *testing.T) {
		t.Parallel()
		v, err := New(Options{Registries: config.Registries{ContainerdHostsDir: hostsDir}, RetryBackoff: 5 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if res := v.Verify(t.Context(), p, d.Host+"/team/app", digest); res.Verdict != verdict.Pending {
			t.Fatalf("anonymous: %s/%s: %s", res.Verdict, res.Reason, res.Detail)
		}
	})
	t.Run("without the CA", func(t *testing.T) {
		t.Parallel()
		o := nodeCredentials(t, d.Host)["docker config auths"]
		o.RetryBackoff = 5 * time.Millisecond
		v, err := New(o)
		if err != nil {
			t.Fatal(err)
		}
		res := v.Verify(t.Context(), p, d.Host+"/team/app", digest)
		if res.Verdict != verdict.Pending || !strings.Contains(res.Detail, "certificate") {
			t.Fatalf("no CA: %s/%s: %s", res.Verdict, res.Reason, res.Detail)
		}
	})
}

// TestRequestsPerColdVerificationDistribution counts the requests a registry sees: the
// ping and the auth challenge are per host, so a new repository in a known
// host costs the signature requests plus, with bearer auth, one token. The
// signature requests are the manifest alone when the payload is the one
// cosign writes for the name being verified (knownPayload), else manifest
// and layer.
func TestRequestsPerColdVerificationDistribution(t *testing.T) {
	t.Parallel()
	ca := harness.NewCA(t)
	front := harness.NewTokenFront(t, ca, map[string]string{nodeUser: nodePass})
	d := harness.StartDistributionWith(t, harness.DistributionOptions{Token: front.Auth, Seed: true})
	front.Serve(t, d.Host, ca.Issue("front"))
	signer := harness.NewSigner(t)
	repos := []string{"a", "b", "c"}
	// a and b are signed under the name pinwarden verifies; c under the
	// seed's name, so its payload must be fetched.
	signAs := []string{front.Host + "/team/a", front.Host + "/team/b", ""}
	var digests []string
	for i, repo := range repos {
		dg := harness.PushRandomImage(t, d.SeedHost+"/team/"+repo+":v1", 256)
		signer.SignWith(t, d.SeedHost+"/team/"+repo, dg, harness.SignOptions{As: signAs[i]})
		digests = append(digests, dg)
	}
	o := nodeCredentials(t, front.Host)["docker config auths"]
	o.Registries.ContainerdHostsDir = certsD(t, front.Host, fmt.Sprintf("server = \"https://%s\"\nca = %q\n", front.Host, ca.CertPath))
	v, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	p := signerPolicy(t, signer)
	want := []int64{3, 2, 3} // ping+token+manifest, then token+manifest, then token+manifest+layer
	for i, repo := range repos {
		before := front.Requests.Load()
		res := v.Verify(t.Context(), p, front.Host+"/team/"+repo, digests[i])
		if res.Verdict != verdict.Verified {
			t.Fatalf("%s: %s/%s: %s", repo, res.Verdict, res.Reason, res.Detail)
		}
		if got := front.Requests.Load() - before; got != want[i] {
			t.Errorf("repository %s: %d requests, want %d", repo, got, want[i])
		}
	}
	// Anonymous registry: ping+manifest cold, then the manifest alone per
	// new repository; an annotated payload adds its layer.
	reg := harness.StartDistributionWith(t, harness.DistributionOptions{})
	counting := &countingProxy{}
	host := counting.start(t, reg.Host)
	opts := []harness.SignOptions{{As: host + "/team/a"}, {As: host + "/team/b"}, {As: host + "/team/c", Annotations: map[string]any{"build": "42"}}}
	for i, repo := range repos {
		dg := harness.PushRandomImage(t, reg.Host+"/team/"+repo+":v1", 256)
		signer.SignWith(t, reg.Host+"/team/"+repo, dg, opts[i])
		digests = append(digests, dg)
	}
	va, err := New(Options{Registries: config.Registries{Insecure: []string{host}}})
	if err != nil {
		t.Fatal(err)
	}
	for i, repo := range repos {
		before := counting.n.Load()
		res := va.Verify(t.Context(), p, host+"/team/"+repo, digests[3+i])
		if res.Verdict != verdict.Verified {
			t.Fatalf("anonymous %s: %s/%s: %s", repo, res.Verdict, res.Reason, res.Detail)
		}
		if got, want := counting.n.Load()-before, []int64{2, 1, 2}[i]; got != want {
			t.Errorf("anonymous repository %s: %d requests, want %d", repo, got, want)
		}
	}
}

// TestMirrorWithoutSignatureFallsBack: the mirror has the image but not its
// signature; the signature comes from the upstream and the detail says so.
func TestMirrorWithoutSignatureFallsBack(t *testing.T) {
	t.Parallel()
	upstream := harness.StartDistributionWith(t, harness.DistributionOptions{})
	mirror := harness.StartDistributionWith(t, harness.DistributionOptions{})
	img := harness.RandomImage(t, 256)
	digest := harness.PushImage(t, upstream.Host+"/team/app:v1", img)
	harness.PushImage(t, mirror.Host+"/team/app:v1", img)
	signer := harness.NewSigner(t)
	signer.Sign(t, upstream.Host+"/team/app", digest)
	hostsDir := certsD(t, upstream.Host, fmt.Sprintf("server = \"http://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", upstream.Host, mirror.Host))
	v, err := New(Options{Registries: config.Registries{ContainerdHostsDir: hostsDir}})
	if err != nil {
		t.Fatal(err)
	}
	res := v.Verify(t.Context(), signerPolicy(t, signer), upstream.Host+"/team/app", digest)
	if res.Verdict != verdict.Verified {
		t.Fatalf("%s/%s: %s", res.Verdict, res.Reason, res.Detail)
	}
	want := fmt.Sprintf("mirror %s has the image but not its signature; fell back to %s", mirror.Host, upstream.Host)
	if res.Detail != want {
		t.Fatalf("detail %q, want %q", res.Detail, want)
	}
	// Unsigned everywhere: unverified, and the detail still names the mirror.
	unsigned := harness.PushRandomImage(t, upstream.Host+"/team/app:v2", 256)
	res = v.Verify(t.Context(), signerPolicy(t, signer), upstream.Host+"/team/app", unsigned)
	if res.Verdict != verdict.Unverified || res.Reason != verdict.ReasonNoSignature || !strings.Contains(res.Detail, "mirror "+mirror.Host) {
		t.Fatalf("unsigned: %s/%s: %s", res.Verdict, res.Reason, res.Detail)
	}
}

// TestPullThroughMirrorUpstreamStopped: distribution as a pull-through cache
// keeps serving image and signature after the upstream is gone.
func TestPullThroughMirrorUpstreamStopped(t *testing.T) {
	t.Parallel()
	upstream := harness.StartDistributionWith(t, harness.DistributionOptions{})
	signer := harness.NewSigner(t)
	digest := harness.PushRandomImage(t, upstream.Host+"/team/app:v1", 256)
	// With an annotation, so that the signature layer is fetched through
	// the mirror (not rebuilt: see knownPayload) and must be cached there.
	signer.SignWith(t, upstream.Host+"/team/app", digest, harness.SignOptions{Annotations: map[string]any{"build": "42"}})
	mirror := harness.StartDistributionWith(t, harness.DistributionOptions{ProxyRemoteURL: "http://" + upstream.Host})
	hostsDir := certsD(t, upstream.Host, fmt.Sprintf("server = \"http://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", upstream.Host, mirror.Host))
	p := signerPolicy(t, signer)
	o := Options{Registries: config.Registries{ContainerdHostsDir: hostsDir}, RetryBackoff: 5 * time.Millisecond}
	v, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	if res := v.Verify(t.Context(), p, upstream.Host+"/team/app", digest); res.Verdict != verdict.Verified || res.Detail != "" {
		t.Fatalf("through the mirror: %s/%s: %q", res.Verdict, res.Reason, res.Detail)
	}
	// The cache stores blobs after serving them: wait for the signature layers.
	for _, l := range harness.SignatureLayers(t, upstream.Host+"/team/app", digest) {
		mirror.WaitBlobStored(t, l)
	}
	upstream.Stop()
	v2, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	if res := v2.Verify(t.Context(), p, upstream.Host+"/team/app", digest); res.Verdict != verdict.Verified {
		t.Fatalf("upstream stopped: %s/%s: %s", res.Verdict, res.Reason, res.Detail)
	}
	// Never pulled through the mirror: pending, never verified.
	if res := v2.Verify(t.Context(), p, upstream.Host+"/team/other", digest); res.Verdict != verdict.Pending {
		t.Fatalf("uncached with upstream stopped: %s/%s: %s", res.Verdict, res.Reason, res.Detail)
	}
}

func ptrTo[T any](v T) *T { return &v }

// countingProxy is a plain-HTTP reverse proxy that counts requests.
type countingProxy struct{ n atomic.Int64 }

func (c *countingProxy) start(t *testing.T, backend string) string {
	t.Helper()
	target, _ := url.Parse("http://" + backend)
	rp := httputil.NewSingleHostReverseProxy(target)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.n.Add(1)
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// TestConcurrentColdVerificationsPingOnce: 16 cold verifications of one host
// at once share one ping.
func TestConcurrentColdVerificationsPingOnce(t *testing.T) {
	t.Parallel()
	reg := harness.StartDistributionWith(t, harness.DistributionOptions{})
	counting := &countingProxy{}
	host := counting.start(t, reg.Host)
	signer := harness.NewSigner(t)
	const n = 16
	digests := make([]string, n)
	for i := range n {
		digests[i] = harness.PushRandomImage(t, fmt.Sprintf("%s/team/app-%d:v1", reg.Host, i), 128)
		signer.Sign(t, fmt.Sprintf("%s/team/app-%d", reg.Host, i), digests[i])
	}
	v, err := New(Options{Registries: config.Registries{Insecure: []string{host}}})
	if err != nil {
		t.Fatal(err)
	}
	p := signerPolicy(t, signer)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if res := v.Verify(t.Context(), p, fmt.Sprintf("%s/team/app-%d", host, i), digests[i]); res.Verdict != verdict.Verified {
				t.Errorf("%d: %s/%s: %s", i, res.Verdict, res.Reason, res.Detail)
			}
		})
	}
	wg.Wait()
	if got, want := counting.n.Load(), int64(1+2*n); got != want {
		t.Fatalf("%d requests for %d cold verifications, want %d (one ping)", got, n, want)
	}
}
