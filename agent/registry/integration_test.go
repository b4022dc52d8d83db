package registry_test

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/registry"
	"github.com/pinwarden/pinwarden/agent/registry/hosts"
	"github.com/pinwarden/pinwarden/test/harness"
)

const (
	user = "node-user"
	pass = "n0de-s3cret-pass"
)

// credSources returns one registries config per kind of node credential,
// each giving user/pass for host.
func credSources(t *testing.T, host string) map[string]registry.Options {
	t.Helper()
	c := harness.WriteNodeCredentials(t, host, user, pass)
	return map[string]registry.Options{
		"docker config auths":         {Registries: config.Registries{DockerConfig: c.DockerConfig}},
		"docker credential helper":    {Registries: config.Registries{DockerConfig: c.HelperConfig}, CredentialHelperDir: c.HelperDir},
		"kubelet credential provider": {Registries: config.Registries{CredentialProviderConfig: c.ProviderConfig, CredentialProviderBinDir: c.ProviderBinDir}},
	}
}

func writeFile(t *testing.T, p, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

// hostsDirFor writes certs.d/<host>/hosts.toml (containerd's directory
// naming for host:port) with body.
func hostsDirFor(t *testing.T, host, body string) string {
	t.Helper()
	root := t.TempDir()
	h, port, _ := strings.Cut(host, ":")
	writeFile(t, filepath.Join(root, h+"_"+port+"_", "hosts.toml"), body)
	return root
}

// fetchSignature reads repo@digest and its cosign .sig tag the way the
// verifier does: through the first endpoint that has them, with the node's
// keychain and the endpoint's TLS.
func fetchSignature(t *testing.T, kc *registry.Keychain, res *hosts.Resolver, rt http.RoundTripper, repo, digest string) (endpoint string, err error) {
	t.Helper()
	host, path, _ := strings.Cut(repo, "/")
	eps, err := res.Endpoints(t.Context(), host)
	if err != nil {
		return "", err
	}
	var lastErr error
	for _, e := range eps {
		var opts []name.Option
		if e.Scheme == "http" {
			opts = append(opts, name.Insecure)
		}
		r, err := name.NewRepository(e.Host+"/"+path, opts...)
		if err != nil {
			return "", err
		}
		ro := []remote.Option{remote.WithContext(t.Context()), remote.WithTransport(res.Transport(rt)), remote.WithAuthFromKeychain(kc)}
		if _, err := remote.Head(r.Digest(digest), ro...); err != nil {
			lastErr = err
			continue
		}
		if _, err := remote.Get(r.Tag(strings.Replace(digest, ":", "-", 1)+".sig"), ro...); err != nil {
			lastErr = err
			continue
		}
		return e.Host, nil
	}
	return "", lastErr
}

func TestBasicAuthOverTLSWithPrivateCA(t *testing.T) {
	t.Parallel()
	ca := harness.NewCA(t)
	d := harness.StartDistributionWith(t, harness.DistributionOptions{TLS: ptr(ca.Issue("registry")), Htpasswd: map[string]string{user: pass}, Seed: true})
	digest := harness.PushRandomImage(t, d.SeedHost+"/team/app:v1", 512)
	harness.NewSigner(t).Sign(t, d.SeedHost+"/team/app", digest)
	certsD := hostsDirFor(t, d.Host, fmt.Sprintf("server = \"https://%s\"\nca = %q\n", d.Host, ca.CertPath))

	for kind, opts := range credSources(t, d.Host) {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			kc, err := registry.NewKeychain(opts)
			if err != nil {
				t.Fatal(err)
			}
			res := hosts.New(certsD)
			ep, err := fetchSignature(t, kc, res, http.DefaultTransport, d.Host+"/team/app", digest)
			if err != nil || ep != d.Host {
				t.Fatalf("fetch with %s: endpoint %q, %v", kind, ep, err)
			}
			if !kc.AllowsBasic(d.Host, "Basic "+base64.StdEncoding.EncodeToString([]byte(user+":"+pass))) {
				t.Fatal("keychain did not record the credentials it issued for the host")
			}
			if kc.AllowsBasic("127.0.0.1:1", "Basic "+base64.StdEncoding.EncodeToString([]byte(user+":"+pass))) {
				t.Fatal("credentials allowed for another host")
			}
		})
	}
	t.Run("anonymous is refused", func(t *testing.T) {
		t.Parallel()
		kc, err := registry.NewKeychain(registry.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fetchSignature(t, kc, hosts.New(certsD), http.DefaultTransport, d.Host+"/team/app", digest); err == nil || !strings.Contains(err.Error(), "401") {
			t.Fatalf("anonymous fetch: %v, want 401", err)
		}
	})
	t.Run("without the CA", func(t *testing.T) {
		t.Parallel()
		kc, err := registry.NewKeychain(credSources(t, d.Host)["docker config auths"])
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fetchSignature(t, kc, hosts.New(""), http.DefaultTransport, d.Host+"/team/app", digest); err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("fetch without the CA: %v, want a certificate error", err)
		}
	})
}

func TestBearerTokenFlow(t *testing.T) {
	t.Parallel()
	ca := harness.NewCA(t)
	front := harness.NewTokenFront(t, ca, map[string]string{user: pass})
	d := harness.StartDistributionWith(t, harness.DistributionOptions{Token: front.Auth, Seed: true})
	front.Serve(t, d.Host, ca.Issue("front"))
	digest := harness.PushRandomImage(t, d.SeedHost+"/team/app:v1", 512)
	harness.NewSigner(t).Sign(t, d.SeedHost+"/team/app", digest)
	certsD := hostsDirFor(t, front.Host, fmt.Sprintf("server = \"https://%s\"\nca = %q\n", front.Host, ca.CertPath))

	for kind, opts := range credSources(t, front.Host) {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			kc, err := registry.NewKeychain(opts)
			if err != nil {
				t.Fatal(err)
			}
			tokens := front.Tokens.Load()
			ep, err := fetchSignature(t, kc, hosts.New(certsD), http.DefaultTransport, front.Host+"/team/app", digest)
			if err != nil || ep != front.Host {
				t.Fatalf("fetch: endpoint %q, %v", ep, err)
			}
			if front.Tokens.Load() == tokens {
				t.Fatal("no token was issued: the bearer flow did not run")
			}
		})
	}
	t.Run("anonymous token has no access", func(t *testing.T) {
		t.Parallel()
		kc, _ := registry.NewKeychain(registry.Options{})
		if _, err := fetchSignature(t, kc, hosts.New(certsD), http.DefaultTransport, front.Host+"/team/app", digest); err == nil {
			t.Fatal("anonymous fetch succeeded")
		}
	})
}

func TestPullThroughMirrorWithUpstreamStopped(t *testing.T) {
	t.Parallel()
	upstream := harness.StartDistributionWith(t, harness.DistributionOptions{})
	digest := harness.PushRandomImage(t, upstream.Host+"/team/app:v1", 512)
	harness.NewSigner(t).Sign(t, upstream.Host+"/team/app", digest)
	mirror := harness.StartDistributionWith(t, harness.DistributionOptions{ProxyRemoteURL: "http://" + upstream.Host})
	certsD := hostsDirFor(t, upstream.Host, fmt.Sprintf(`server = "http://%s"
[host."http://%s"]
  capabilities = ["pull", "resolve"]
`, upstream.Host, mirror.Host))
	kc, _ := registry.NewKeychain(registry.Options{})
	counting := http.DefaultTransport
	// The node pulls through the mirror, which caches image and signature.
	ep, err := fetchSignature(t, kc, hosts.New(certsD), counting, upstream.Host+"/team/app", digest)
	if err != nil || ep != mirror.Host {
		t.Fatalf("through the mirror: endpoint %q, %v", ep, err)
	}
	upstream.Stop()
	ep, err = fetchSignature(t, kc, hosts.New(certsD), counting, upstream.Host+"/team/app", digest)
	if err != nil || ep != mirror.Host {
		t.Fatalf("upstream stopped: endpoint %q, %v", ep, err)
	}
}

func ptr[T any](v T) *T { return &v }
