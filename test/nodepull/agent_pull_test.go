package nodepull

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// protected is a registry that refuses anonymous pulls, with a signed image
// (team/app:v1) and an unsigned one (team/app:v2).
type protected struct {
	host             string // what the node pulls from (https)
	signed, unsigned string // manifest digests
}

// pushProtected pushes the two images through seed, an open instance on the
// same storage as host, and signs the first.
func pushProtected(t *testing.T, host, seed string, signer *harness.Signer) protected {
	t.Helper()
	p := protected{host: host}
	p.signed = harness.PushRandomImage(t, seed+"/team/app:v1", 1024)
	signer.Sign(t, seed+"/team/app", p.signed)
	p.unsigned = harness.PushRandomImage(t, seed+"/team/app:v2", 1024)
	return p
}

// TestAgentPullsAndJudgesWithNodeCredentials runs `pinwarden agent` on a
// real containerd (each line) with the node's credentials for a registry
// that refuses anonymous pulls, and with both images of that registry
// pinned. The agent's prefetcher verifies the signed pin with those
// credentials, then has containerd pull it through CRI PullImage with the
// same credentials, through the same hosts.toml (private CA); the agent then
// judges the digest that containerd has: verified. The unsigned pin is
// rejected and not pulled; pulled the way kubelet would, it is judged
// unverified/no-signature (not pending: the agent read the registry with
// the credentials). Registries: distribution with htpasswd over TLS, and
// distribution behind a bearer token service (containerd asks the token
// endpoint with the OAuth2 password grant, pinwarden with GET and basic
// auth). Credentials: a docker-credential-* helper named in credHelpers,
// the static auths of a docker config, a kubelet credential provider plugin.
func TestAgentPullsAndJudgesWithNodeCredentials(t *testing.T) {
	harness.SkipShort(t, "containerd, distribution and the agent binary")
	ca := harness.NewCA(t)
	signer := harness.NewSigner(t)
	basic := harness.StartDistributionWith(t, harness.DistributionOptions{TLS: ptr(ca.Issue("registry")), Htpasswd: map[string]string{user: pass}, Seed: true})
	front := harness.NewTokenFront(t, ca, map[string]string{user: pass})
	behind := harness.StartDistributionWith(t, harness.DistributionOptions{Token: front.Auth, Seed: true})
	front.Serve(t, behind.Host, ca.Issue("front"))
	registries := map[string]protected{
		"htpasswd over TLS": pushProtected(t, basic.Host, basic.SeedHost, signer),
		"bearer token":      pushProtected(t, front.Host, behind.SeedHost, signer),
	}

	plugin := func(c harness.NodeCredentials) (func(*config.Registries), []string) {
		return func(r *config.Registries) {
			r.CredentialProviderConfig, r.CredentialProviderBinDir = c.ProviderConfig, c.ProviderBinDir
		}, nil
	}
	helper := func(c harness.NodeCredentials) (func(*config.Registries), []string) {
		return func(r *config.Registries) { r.DockerConfig = c.HelperConfig },
			[]string{"PATH=" + c.HelperDir + string(os.PathListSeparator) + os.Getenv("PATH")}
	}
	auths := func(c harness.NodeCredentials) (func(*config.Registries), []string) {
		return func(r *config.Registries) { r.DockerConfig = c.DockerConfig }, nil
	}
	cases := []struct {
		registry, creds string
		source          func(harness.NodeCredentials) (func(*config.Registries), []string)
		viaHelper       bool // the helper's calls.log must show a get for the host
	}{
		{"htpasswd over TLS", "credential provider plugin", plugin, false},
		{"htpasswd over TLS", "docker credential helper", helper, true},
		{"bearer token", "docker config auths", auths, false},
		{"bearer token", "credential provider plugin", plugin, false},
		{"bearer token", "docker credential helper", helper, true},
	}
	for _, f := range harness.Flavours() {
		for _, c := range cases {
			t.Run(f.Name+"/"+c.registry+"/"+c.creds, func(t *testing.T) {
				reg := registries[c.registry]
				repo := reg.host + "/team/app"
				ctd := harness.StartContainerd(t, harness.WithFlavour(f))
				// containerd 1.6 refuses a hosts.toml without a [host] table.
				ctd.WriteHostsTOML(reg.host, fmt.Sprintf("server = \"https://%s\"\n[host.\"https://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = %q\n", reg.host, reg.host, ca.CertPath))
				rt := harness.DialCRI(t, ctd)
				if _, err := rt.PullImage(t.Context(), repo+"@"+reg.signed, nil); err == nil {
					t.Fatal("anonymous pull succeeded: the registry does not require the credentials")
				}

				creds := harness.WriteNodeCredentials(t, reg.host, user, pass)
				regs, env := c.source(creds)
				pins := fmt.Sprintf("%s:v1@%s\n%s:v2@%s\n", repo, reg.signed, repo, reg.unsigned)
				a := startPrefetchingAgent(t, ctd, harness.KeyPolicy("node", reg.host+"/team/**", signer.PubPath), pins, regs, env...)

				if im := a.WaitVerdict(reg.signed, 2*time.Minute); im.Verdict != "verified" {
					t.Fatalf("signed pin pulled by the prefetcher: %+v", im)
				}
				wantPulled(t, a, 1)
				harness.Eventually(t, time.Minute, "unsigned pin rejected", func() (bool, string) {
					n := harness.SumMetric(a.Metrics(), "pinwarden_prefetch_total", `result="rejected"`)
					return n >= 1, fmt.Sprintf("pinwarden_prefetch_total{result=\"rejected\"} = %v", n)
				})
				if im, err := rt.ImageStatus(t.Context(), repo+"@"+reg.unsigned); err != nil || im != nil {
					t.Fatalf("the rejected pin is on the node (%+v, %v)", im, err)
				}
				if c.viaHelper {
					calls, err := os.ReadFile(filepath.Join(creds.HelperDir, "calls.log"))
					if err != nil || !strings.Contains(string(calls), "get "+reg.host) {
						t.Fatalf("the credential helper was not asked for %s (%v): %q", reg.host, err, calls)
					}
				}

				// Pulled the way kubelet would, with the node's credentials.
				if _, err := rt.PullImage(t.Context(), repo+":v2", &cri.Auth{Username: user, Password: pass}); err != nil {
					t.Fatalf("pull %s:v2 with the credentials: %v", repo, err)
				}
				if im := a.WaitVerdict(reg.unsigned, 2*time.Minute); im.Verdict != "unverified" || im.Reason != "no-signature" {
					t.Fatalf("unsigned image: %+v, want unverified/no-signature", im)
				}
				if leaks := harness.Leaks(a.Outputs(), user, pass); len(leaks) > 0 {
					t.Errorf("credentials shown: %v", leaks)
				}
			})
		}
	}
}
