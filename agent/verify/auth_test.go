package verify

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/pinwarden/pinwarden/agent/config"
)

// TestCredentials: a host gets exactly its own entry of the docker config;
// Docker Hub's entry answers for docker.io.
func TestCredentials(t *testing.T) {
	t.Parallel()
	p := filepath.Join(t.TempDir(), "config.json")
	body := `{"auths":{"https://Reg.Example:5000/v1/":{"auth":"dTpw"},"https://index.docker.io/v1/":{"identitytoken":"tok"}}}`
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	v, err := New(Options{Registries: config.Registries{DockerConfig: p}})
	if err != nil {
		t.Fatal(err)
	}
	if ac, ok := v.Credentials("reg.example:5000"); !ok || ac.Username != "u" || ac.Password != "p" {
		t.Errorf("reg.example:5000: %v", ok)
	}
	if _, ok := v.Credentials("reg.example"); ok {
		t.Error("credentials of reg.example:5000 given to reg.example")
	}
	if ac, ok := v.Credentials("docker.io"); !ok || ac.IdentityToken != "tok" {
		t.Errorf("docker.io: %v", ok)
	}
}
