package harness

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// NodeCredentials are the files of every kind of node credential, each
// giving the same user and password for one registry host.
type NodeCredentials struct {
	// DockerConfig is a docker config.json with static auths.
	DockerConfig string
	// HelperConfig is a docker config.json naming the credential helper
	// docker-credential-pwtest (a FakeBinary in HelperDir) in credHelpers.
	HelperConfig, HelperDir string
	// ProviderConfig is a kubelet CredentialProviderConfig naming the
	// plugin pw-plugin (a FakeBinary in ProviderBinDir).
	ProviderConfig, ProviderBinDir string
}

// WriteNodeCredentials writes NodeCredentials for host under a new
// temporary directory.
func WriteNodeCredentials(t testing.TB, host, user, pass string) NodeCredentials {
	t.Helper()
	dir := t.TempDir()
	c := NodeCredentials{
		DockerConfig:   filepath.Join(dir, "static.json"),
		HelperConfig:   filepath.Join(dir, "helped.json"),
		HelperDir:      filepath.Join(dir, "helpers"),
		ProviderConfig: filepath.Join(dir, "credential-provider.yaml"),
		ProviderBinDir: filepath.Join(dir, "plugins"),
	}
	for _, d := range []string{c.HelperDir, c.ProviderBinDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b64 := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	WriteFile(t, c.DockerConfig, []byte(`{"auths": {"`+host+`": {"auth": "`+b64+`"}}}`))

	FakeBinary(t, "credhelper", c.HelperDir, "docker-credential-pwtest")
	store, err := json.Marshal(map[string]map[string]string{host: {"Username": user, "Secret": pass}})
	if err != nil {
		t.Fatal(err)
	}
	WriteFile(t, filepath.Join(c.HelperDir, "store.json"), store)
	WriteFile(t, c.HelperConfig, []byte(`{"credHelpers": {"`+host+`": "pwtest"}}`))

	FakeBinary(t, "credprovider", c.ProviderBinDir, "pw-plugin")
	auth, err := json.Marshal(map[string]any{host: map[string]string{"username": user, "password": pass}})
	if err != nil {
		t.Fatal(err)
	}
	WriteFile(t, c.ProviderConfig, fmt.Appendf(nil, `apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
- name: pw-plugin
  matchImages: [%q]
  defaultCacheDuration: 10m
  apiVersion: credentialprovider.kubelet.k8s.io/v1
  env: [{name: FAKE_CP_AUTH, value: %q}]
`, host, auth))
	return c
}

// SignatureLayers returns the digests of the layers of the legacy `.sig`
// image of repo@digest (plain HTTP), e.g. to wait until a pull-through
// mirror has stored them.
func SignatureLayers(t testing.TB, repo, digest string) []string {
	t.Helper()
	ref, err := name.ParseReference(repo+":"+strings.Replace(digest, ":", "-", 1)+".sig", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(ref, remote.WithContext(t.Context()))
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	out := make([]string, len(m.Layers))
	for i, l := range m.Layers {
		out[i] = l.Digest.String()
	}
	return out
}
