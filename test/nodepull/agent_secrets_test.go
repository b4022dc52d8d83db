package nodepull

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
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
// per kind of node credential, and scans the agent's log, /metrics and the
// status API for the credentials. (Events need an API server; the event text
// is built from the same verdict detail that the status API shows.)
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

	dir := t.TempDir()
	b64 := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	static := filepath.Join(dir, "static.json")
	harness.WriteFile(t, static, []byte(`{"auths": {"`+d.Host+`": {"auth": "`+b64+`"}}}`))
	helperDir := filepath.Join(dir, "helpers")
	if err := os.MkdirAll(helperDir, 0o755); err != nil {
		t.Fatal(err)
	}
	harness.FakeBinary(t, "credhelper", helperDir, "docker-credential-pwtest")
	harness.WriteFile(t, filepath.Join(helperDir, "store.json"), []byte(fmt.Sprintf(`{%q: {"Username": %q, "Secret": %q}}`, d.Host, user, pass)))
	helped := filepath.Join(dir, "helped.json")
	harness.WriteFile(t, helped, []byte(`{"credHelpers": {"`+d.Host+`": "pwtest"}}`))
	plugins := filepath.Join(dir, "plugins")
	if err := os.MkdirAll(plugins, 0o755); err != nil {
		t.Fatal(err)
	}
	harness.FakeBinary(t, "credprovider", plugins, "pw-plugin")
	auth, _ := json.Marshal(map[string]any{d.Host: map[string]string{"username": user, "password": pass}})
	cpc := filepath.Join(dir, "cp.yaml")
	harness.WriteFile(t, cpc, []byte(fmt.Sprintf("apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: pw-plugin\n  matchImages: [%q]\n  defaultCacheDuration: 5m\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n  env: [{name: FAKE_CP_AUTH, value: %q}]\n", d.Host, auth)))

	kinds := []struct {
		name string
		regs config.Registries
		env  []string
	}{
		{"docker config auths", config.Registries{DockerConfig: static}, nil},
		{"docker credential helper", config.Registries{DockerConfig: helped}, []string{"PATH=" + helperDir + ":" + os.Getenv("PATH")}},
		{"kubelet credential provider", config.Registries{CredentialProviderConfig: cpc, CredentialProviderBinDir: plugins}, nil},
	}
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			adir := t.TempDir()
			cfg := harness.AgentConfig(ctd.Endpoint(), filepath.Join(adir, "state"))
			cfg.MetricsAddress, cfg.StatusAddress = harness.FreeAddr(t), harness.FreeAddr(t)
			cfg.Registries.DockerConfig = k.regs.DockerConfig
			cfg.Registries.CredentialProviderConfig = k.regs.CredentialProviderConfig
			cfg.Registries.CredentialProviderBinDir = k.regs.CredentialProviderBinDir
			cfg.Registries.ContainerdHostsDir = ctd.HostsDir()
			cfg.Policies = []config.Policy{harness.KeyPolicy("node", d.Host+"/team/**", signer.PubPath)}
			path := harness.WriteConfig(t, filepath.Join(adir, "config.yaml"), cfg)
			a := harness.StartAgent(t, agentBin, path, cfg.MetricsAddress, cfg.StatusAddress, harness.WithAgentEnv(k.env...))
			if im := a.WaitVerdict(signed, time.Minute); im.Verdict != "verified" {
				t.Fatalf("signed image: %+v", im)
			}
			if im := a.WaitVerdict(unsigned, time.Minute); im.Verdict != "unverified" || im.Reason != "no-signature" {
				t.Fatalf("unsigned image: %+v", im)
			}
			outputs := map[string]string{
				"log":        a.Log(),
				"metrics":    httpGet(t, a.MetricsURL+"/metrics"),
				"status API": httpGet(t, "http://"+a.StatusAddr+"/v1/images"),
			}
			for where, text := range outputs {
				for _, secret := range []string{pass, b64} {
					if strings.Contains(text, secret) {
						t.Errorf("credential in the agent's %s:\n%s", where, text)
					}
				}
			}
		})
	}
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v", url, resp.Status, err)
	}
	return string(b)
}
