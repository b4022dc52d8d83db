package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// TestRunPrefetchesPins: the agent, with prefetch enabled, pulls a signed
// pin, never the unsigned one, and picks up a pin added to the pin file
// while it runs (reload -> SetPins).
func TestRunPrefetchesPins(t *testing.T) {
	t.Parallel()
	reg := harness.StartRegistry(t)
	ctd := harness.StartContainerd(t, harness.WithInsecureRegistry(reg))
	s := harness.NewSigner(t)
	push := func(repo string, signed bool) string {
		d := harness.PushRandomImage(t, reg+"/"+repo+":v1", 2048)
		if signed {
			s.Sign(t, reg+"/"+repo, d)
		}
		return reg + "/" + repo + "@" + d
	}
	signed, unsigned, later := push("agent/signed", true), push("agent/unsigned", false), push("agent/later", true)

	dir := t.TempDir()
	pinFile := filepath.Join(dir, "pins.txt")
	if err := os.WriteFile(pinFile, []byte(signed+"\n"+unsigned+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "config.yaml")
	cfg := fmt.Sprintf(`runtimeEndpoint: %s
stateDir: %s
metricsAddress: ""
statusAddress: ""
registries:
  insecure: [%q]
policies:
- name: signed
  images: ["%s/**"]
  keys: [%q]
pins: [%q]
kubernetes:
  enabled: false
`, ctd.Endpoint(), filepath.Join(dir, "state"), reg, reg, s.PubPath, pinFile)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfgPath, "test", slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	}()

	c, err := cri.Dial(t.Context(), ctd.Endpoint(), "k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitPresent := func(ref string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			st, err := c.ImageStatus(t.Context(), ref)
			if err != nil {
				t.Fatal(err)
			}
			if st != nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s was not prefetched", ref)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitPresent(signed)
	if err := os.WriteFile(pinFile, []byte(signed+"\n"+unsigned+"\n"+later+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	waitPresent(later)
	if st, err := c.ImageStatus(t.Context(), unsigned); err != nil || st != nil {
		t.Errorf("unsigned pin on the node: %+v %v", st, err)
	}
}

// TestRunPrefetchDisabled: with prefetch.enabled false the agent pulls nothing.
func TestRunPrefetchDisabled(t *testing.T) {
	t.Parallel()
	reg := harness.StartRegistry(t)
	ctd := harness.StartContainerd(t, harness.WithInsecureRegistry(reg))
	s := harness.NewSigner(t)
	d := harness.PushRandomImage(t, reg+"/agent/off:v1", 2048)
	s.Sign(t, reg+"/agent/off", d)
	ref := reg + "/agent/off@" + d
	dir := t.TempDir()
	pinFile := filepath.Join(dir, "pins.txt")
	if err := os.WriteFile(pinFile, []byte(ref+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "config.yaml")
	cfg := fmt.Sprintf("runtimeEndpoint: %s\nstateDir: %s\nmetricsAddress: \"\"\nstatusAddress: \"\"\nregistries:\n  insecure: [%q]\n"+
		"policies:\n- name: signed\n  images: [\"%s/**\"]\n  keys: [%q]\npins: [%q]\nprefetch:\n  enabled: false\nkubernetes:\n  enabled: false\n",
		ctd.Endpoint(), filepath.Join(dir, "state"), reg, reg, s.PubPath, pinFile)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	if err := Run(ctx, cfgPath, "test", slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		t.Fatalf("Run = %v", err)
	}
	c, err := cri.Dial(t.Context(), ctd.Endpoint(), "k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if st, err := c.ImageStatus(t.Context(), ref); err != nil || st != nil {
		t.Errorf("pin pulled with prefetch disabled: %+v %v", st, err)
	}
}
