package nodepull

import (
	"encoding/base64"
	"fmt"
	"testing"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/agent/verify"
	"github.com/pinwarden/pinwarden/test/harness"
)

// TestNodePullsWithHostsHeaderCredentials: a registry with htpasswd over
// TLS whose credentials the node has only as an Authorization header in
// hosts.toml (how a private Harbor proxy-cache project is reached when the
// kubelet's credentials are for another registry, docs/registries.md).
// containerd pulls with no CRI credentials, and pinwarden, with no
// credential source configured, verifies through the same header.
func TestNodePullsWithHostsHeaderCredentials(t *testing.T) {
	ca := harness.NewCA(t)
	d := harness.StartDistributionWith(t, harness.DistributionOptions{TLS: ptr(ca.Issue("registry")), Htpasswd: map[string]string{user: pass}, Seed: true})
	signer := harness.NewSigner(t)
	digest := harness.PushRandomImage(t, d.SeedHost+"/team/app:v1", 1024)
	signer.Sign(t, d.SeedHost+"/team/app", digest)

	ctd, c := startNode(t)
	basic := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	hostsTOML := func(header string) string {
		return fmt.Sprintf("server = \"https://%s\"\n[host.\"https://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = %q\n%s",
			d.Host, d.Host, ca.CertPath, header)
	}
	// Without the header neither the node nor pinwarden gets in.
	ctd.WriteHostsTOML(d.Host, hostsTOML(""))
	if _, err := c.PullImage(t.Context(), d.Host+"/team/app:v1", nil); err == nil {
		t.Fatal("containerd pulled without credentials")
	}
	p := policyFor(t, signer)
	opts := verify.Options{Registries: config.Registries{ContainerdHostsDir: ctd.HostsDir()}}
	v, err := verify.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if res := v.Verify(t.Context(), p, d.Host+"/team/app", digest); res.Verdict == verdict.Verified {
		t.Fatal("pinwarden verified without credentials")
	}

	ctd.WriteHostsTOML(d.Host, hostsTOML(fmt.Sprintf("  [host.\"https://%s\".header]\n    Authorization = \"Basic %s\"\n", d.Host, basic)))
	if pulled := pulledDigest(t, c, d.Host+"/team/app:v1", nil); pulled != digest {
		t.Fatalf("containerd pulled %s, pushed %s", pulled, digest)
	}
	v, err = verify.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if res := v.Verify(t.Context(), p, d.Host+"/team/app", digest); res.Verdict != verdict.Verified {
		t.Fatalf("pinwarden with the hosts.toml header: %s/%s: %s", res.Verdict, res.Reason, res.Detail)
	}
}

// policyFor compiles a policy requiring s's signature on every image.
func policyFor(t *testing.T, s *harness.Signer) *policy.Policy {
	t.Helper()
	set, err := policy.Compile(&config.Config{Policies: []config.Policy{harness.KeyPolicy("node", "**", s.PubPath)}})
	if err != nil {
		t.Fatal(err)
	}
	return set.Policies[0]
}
