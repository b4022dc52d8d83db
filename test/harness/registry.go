package harness

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
)

// DistributionBin is the Debian docker-registry (distribution 2.8) binary;
// PINWARDEN_DISTRIBUTION_BIN overrides it.
const DistributionBin = "/usr/bin/docker-registry"

// StartRegistry starts an in-process OCI registry (go-containerregistry, with
// OCI referrers support) on a loopback port and returns its host:port. It
// stops when the test ends.
func StartRegistry(t testing.TB) string {
	t.Helper()
	srv := httptest.NewServer(RegistryHandler())
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// RegistryHandler is the in-process OCI registry (go-containerregistry,
// with OCI referrers support, quiet) for tests that put their own
// middleware in front of it: counting requests, taking it down.
func RegistryHandler() http.Handler {
	return registry.New(registry.WithReferrersSupport(true), registry.Logger(log.New(io.Discard, "", 0)))
}

// StartDistribution starts the Debian distribution registry on a free
// loopback port with filesystem storage under t.TempDir(), waits until /v2/
// answers and returns its host:port. Skips (or fails when CI=true) when the
// binary is missing.
func StartDistribution(t testing.TB) string {
	t.Helper()
	SkipShort(t, "the distribution registry")
	bin := DistributionBin
	if v := os.Getenv("PINWARDEN_DISTRIBUTION_BIN"); v != "" {
		bin = v
	}
	RequireBinary(t, bin)
	dir := t.TempDir()
	host := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), host)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatalf("distribution config: %v", err)
	}
	logPath := filepath.Join(dir, "registry.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatalf("distribution log: %v", err)
	}
	cmd := exec.Command(bin, "serve", cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = logf.Close()
		t.Fatalf("start %s: %v", bin, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); _ = logf.Close(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("distribution log:\n%s", b)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+host+"/v2/", nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return host
			}
		}
		select {
		case <-done:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("distribution exited during start:\n%s", b)
		case <-ctx.Done():
			t.Fatalf("distribution on %s not ready: %v", host, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
