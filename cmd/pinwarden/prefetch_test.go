package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/prefetch"
	"github.com/pinwarden/pinwarden/test/harness"
)

func TestPrefetchUsage(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		args []string
	}{
		{"no config", []string{"prefetch"}},
		{"bad output", []string{"prefetch", "--config", "x.yaml", "--output", "yaml"}},
		{"extra argument", []string{"prefetch", "--config", "x.yaml", "nginx"}},
		{"missing config file", []string{"prefetch", "--config", filepath.Join(t.TempDir(), "none.yaml")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var out, errb bytes.Buffer
			if code := run(t.Context(), tt.args, &out, &errb); code != exitUsage {
				t.Errorf("exit %d, want %d; stderr: %s", code, exitUsage, errb.String())
			}
		})
	}
}

// TestPrefetchCommand runs `pinwarden prefetch` against a real containerd and
// a real registry with cosign-signed and unsigned pins.
func TestPrefetchCommand(t *testing.T) {
	t.Parallel()
	node := harness.StartNode(t)
	reg := node.Registry.Host
	s := harness.NewSigner(t)
	signed := reg + "/cli/app@" + harness.PushRandomImage(t, reg+"/cli/app:v1", 2048)
	s.Sign(t, reg+"/cli/app", strings.TrimPrefix(signed, reg+"/cli/app@"))
	unsigned := reg + "/cli/evil@" + harness.PushRandomImage(t, reg+"/cli/evil:v1", 2048)

	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	config := func(pinFile string) string {
		c := harness.AgentConfig(node.Containerd.Endpoint(), filepath.Join(dir, "state"))
		c.Registries.Insecure = []string{reg}
		c.Policies = []config.Policy{harness.KeyPolicy("cli", reg+"/**", s.PubPath)}
		c.Pins = []string{pinFile}
		return harness.WriteConfig(t, filepath.Join(dir, "config-"+pinFile+".yaml"), c)
	}
	write("both.txt", signed+"\n"+unsigned+"  # not signed\n")
	write("good.txt", signed+"\n")

	var out, errb bytes.Buffer
	if code := run(t.Context(), []string{"prefetch", "--config", config("both.txt"), "--output", "json"}, &out, &errb); code != exitNotOK {
		t.Fatalf("exit %d, want %d (one pin rejected); stderr: %s", code, exitNotOK, errb.String())
	}
	var rows []prefetchRow
	if err := json.Unmarshal(out.Bytes(), &rows); err != nil {
		t.Fatalf("json output: %v\n%s", err, out.String())
	}
	if len(rows) != 2 || rows[0].Result != "pulled" || rows[1].Result != "rejected" || rows[1].Reason != "no-signature" {
		t.Errorf("rows %+v", rows)
	}
	if !strings.Contains(errb.String(), "verifying") || !strings.Contains(errb.String(), "pulling") {
		t.Errorf("no plain progress lines on a non-terminal stderr:\n%s", errb.String())
	}

	c := node.CRI
	if st, err := c.ImageStatus(t.Context(), signed); err != nil || st == nil {
		t.Errorf("signed pin not on the node: %v %v", st, err)
	}
	if st, err := c.ImageStatus(t.Context(), unsigned); err != nil || st != nil {
		t.Errorf("unsigned pin on the node: %v %v", st, err)
	}

	out.Reset()
	errb.Reset()
	if code := run(t.Context(), []string{"prefetch", "--config", config("good.txt")}, &out, &errb); code != exitOK {
		t.Fatalf("exit %d, want 0; stderr: %s", code, errb.String())
	}
	if !strings.Contains(out.String(), "RESULT") || !strings.Contains(out.String(), "present") {
		t.Errorf("table output:\n%s", out.String())
	}
}

// TestProgressLive: on a terminal every image keeps one line, redrawn in
// place; elsewhere each step is a plain line.
func TestProgressLive(t *testing.T) {
	t.Parallel()
	a, err := pins.ParseReference("registry.example.com/a:v1@sha256:" + strings.Repeat("a", 64))
	if err != nil {
		t.Fatal(err)
	}
	b, err := pins.ParseReference("registry.example.com/b@sha256:" + strings.Repeat("b", 64))
	if err != nil {
		t.Fatal(err)
	}
	var live bytes.Buffer
	p := newProgress(&live, []pins.Pin{a, b}, true)
	p.update(prefetch.Event{Pin: b, Phase: prefetch.PhaseVerifying})
	p.update(prefetch.Event{Pin: b, Phase: prefetch.ResultRejected, Outcome: &prefetch.Outcome{Result: prefetch.ResultRejected, Verdict: "unverified", Reason: "no-signature"}})
	out := live.String()
	if strings.Count(out, "\x1b[2A") != 2 {
		t.Errorf("expected two redraws of two lines:\n%q", out)
	}
	last := out[strings.LastIndex(out, "\x1b[2A"):]
	if !strings.Contains(last, "waiting") || !strings.Contains(last, "rejected") || !strings.Contains(last, "unverified: no-signature") {
		t.Errorf("last frame %q", last)
	}

	var plain bytes.Buffer
	p = newProgress(&plain, []pins.Pin{a, b}, false)
	p.update(prefetch.Event{Pin: a, Phase: prefetch.PhasePulling})
	if got := plain.String(); strings.Contains(got, "\x1b") || !strings.HasPrefix(got, "pulling") || strings.Count(got, "\n") != 1 {
		t.Errorf("plain progress %q", got)
	}
}
