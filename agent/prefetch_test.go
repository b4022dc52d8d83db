package agent

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// TestRunPrefetchesPins: the agent, with prefetch enabled, pulls a signed
// pin, never the unsigned one, and picks up a pin added to the pin file
// while it runs (reload -> SetPins).
func TestRunPrefetchesPins(t *testing.T) {
	t.Parallel()
	node := harness.StartNode(t)
	reg, c := node.Registry.Host, node.CRI
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
	cfg := harness.AgentConfig(node.Containerd.Endpoint(), filepath.Join(dir, "state"))
	cfg.Registries.Insecure = []string{reg}
	cfg.Policies = []config.Policy{harness.KeyPolicy("signed", reg+"/**", s.PubPath)}
	cfg.Pins = []string{pinFile}
	cfg.Prefetch.Enabled = true
	cfgPath := harness.WriteConfig(t, filepath.Join(dir, "config.yaml"), cfg)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfgPath, "test", slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	}()

	waitPresent := func(ref string) {
		t.Helper()
		harness.Eventually(t, 30*time.Second, ref+" prefetched", func() (bool, string) {
			st, err := c.ImageStatus(t.Context(), ref)
			if err != nil {
				t.Fatal(err)
			}
			return st != nil, "absent"
		})
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
	cfg := harness.AgentConfig(ctd.Endpoint(), filepath.Join(dir, "state"))
	cfg.Registries.Insecure = []string{reg}
	cfg.Policies = []config.Policy{harness.KeyPolicy("signed", reg+"/**", s.PubPath)}
	cfg.Pins = []string{pinFile}
	cfgPath := harness.WriteConfig(t, filepath.Join(dir, "config.yaml"), cfg)
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
