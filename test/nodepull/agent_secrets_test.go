package nodepull

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// TestAgentNeverShowsCredentials runs `pinwarden agent` against a real
// containerd whose images came from a registry with htpasswd over TLS, once
// per kind of node credential, reporting to a real API server, and scans
// the agent's log, /metrics, the status API, every Event and the Node for
// the credentials (as is and in base64). The fourth kind, pod pull secrets,
// is scanned the same way by test/e2e TestPodPullSecretsOnRealAPIServer
// (it needs pods).
func TestAgentNeverShowsCredentials(t *testing.T) {
	harness.SkipShort(t, "containerd and the agent binary")
	ca := harness.NewCA(t)
	d := harness.StartDistributionWith(t, harness.DistributionOptions{TLS: ptr(ca.Issue("registry")), Htpasswd: map[string]string{user: pass}, Seed: true})
	signer := harness.NewSigner(t)
	signed := harness.PushRandomImage(t, d.SeedHost+"/team/app:v1", 512)
	signer.Sign(t, d.SeedHost+"/team/app", signed)
	unsigned := harness.PushRandomImage(t, d.SeedHost+"/team/app:v2", 512)

	ctd, c := startNode(t)
	ctd.WriteHostsTOML(d.Host, fmt.Sprintf("server = \"https://%s\"\nca = %q\n", d.Host, ca.CertPath))
	for _, tag := range []string{"v1", "v2"} {
		pulledDigest(t, c, d.Host+"/team/app:"+tag, &cri.Auth{Username: user, Password: pass})
	}
	kube := harness.StartKube(t)
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	kube.WriteAdminKubeconfig(kubeconfig)

	creds := harness.WriteNodeCredentials(t, d.Host, user, pass)
	kinds := []struct {
		name string
		regs config.Registries
		env  []string
	}{
		{"docker config auths", config.Registries{DockerConfig: creds.DockerConfig}, nil},
		{"docker credential helper", config.Registries{DockerConfig: creds.HelperConfig}, []string{"PATH=" + creds.HelperDir + ":" + os.Getenv("PATH")}},
		{"kubelet credential provider", config.Registries{CredentialProviderConfig: creds.ProviderConfig, CredentialProviderBinDir: creds.ProviderBinDir}, nil},
	}
	for i, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			adir := t.TempDir()
			cfg := harness.AgentConfig(ctd.Endpoint(), filepath.Join(adir, "state"))
			cfg.MetricsAddress, cfg.StatusAddress = harness.FreeAddr(t), harness.FreeAddr(t)
			cfg.Registries.DockerConfig = k.regs.DockerConfig
			cfg.Registries.CredentialProviderConfig = k.regs.CredentialProviderConfig
			cfg.Registries.CredentialProviderBinDir = k.regs.CredentialProviderBinDir
			cfg.Registries.ContainerdHostsDir = ctd.HostsDir()
			cfg.Policies = []config.Policy{harness.KeyPolicy("node", d.Host+"/team/**", signer.PubPath)}
			// Each kind reports on its own Node, so that its events are its own.
			cfg.NodeName = fmt.Sprintf("node-%d", i)
			kube.Node(cfg.NodeName)
			cfg.Kubernetes = config.Kubernetes{Enabled: true, Kubeconfig: kubeconfig, Events: true, NodeCondition: true}
			path := harness.WriteConfig(t, filepath.Join(adir, "config.yaml"), cfg)
			a := harness.StartAgent(t, agentBin, path, cfg.MetricsAddress, cfg.StatusAddress, harness.WithAgentEnv(k.env...))
			if im := a.WaitVerdict(signed, time.Minute); im.Verdict != "verified" {
				t.Fatalf("signed image: %+v", im)
			}
			if im := a.WaitVerdict(unsigned, time.Minute); im.Verdict != "unverified" || im.Reason != "no-signature" {
				t.Fatalf("unsigned image: %+v", im)
			}
			var texts map[string]string
			harness.Eventually(t, 30*time.Second, "the node's event and condition", func() (bool, string) {
				texts = kube.Reported(t)
				return strings.Contains(texts["events"], "Node/"+cfg.NodeName+" ImageUnverified") &&
					strings.Contains(texts["nodes"], "UntrustedImage="), texts["events"] + texts["nodes"]
			})
			maps.Copy(texts, a.Outputs())
			if leaks := harness.Leaks(texts, user, pass); len(leaks) > 0 {
				t.Errorf("credentials shown: %v\n%v", leaks, texts)
			}
		})
	}
}
