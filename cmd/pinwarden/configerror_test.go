package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// The agent waits for missing key files (issue 12), but the one-shot
// commands still exit 2 on them, as on any config error.
func TestOneShotCommandsExit2OnMissingKeyFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	y := "policies:\n- name: p\n  images: [\"**\"]\n  keys: [" + filepath.Join(dir, "keys", "ci.pub") + "]\n"
	if err := os.WriteFile(cfg, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"verify", "--config", cfg, "registry.example/app@sha256:" + string(bytes.Repeat([]byte("a"), 64))},
		{"prefetch", "--config", cfg},
	} {
		var out, errb bytes.Buffer
		if code := run(t.Context(), args, &out, &errb); code != exitUsage {
			t.Errorf("%s: exit %d, want %d; stderr: %s", args[0], code, exitUsage, errb.String())
		}
		if !bytes.Contains(errb.Bytes(), []byte("ci.pub")) {
			t.Errorf("%s: stderr does not name the missing key: %s", args[0], errb.String())
		}
	}
}
