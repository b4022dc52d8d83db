package credprovider_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/pinwarden/pinwarden/agent/registry/credprovider"
	"github.com/pinwarden/pinwarden/test/harness"
)

func TestURLsMatch(t *testing.T) {
	t.Parallel()
	tests := []struct {
		glob, target string
		want         bool
	}{
		{"*.dkr.ecr.*.amazonaws.com", "123456789012.dkr.ecr.us-east-1.amazonaws.com/app", true},
		{"*.dkr.ecr.*.amazonaws.com", "123456789012.dkr.ecr.us-east-1.amazonaws.com.cn/app", false},
		{"*.azurecr.io", "myreg.azurecr.io/team/app:v1", true},
		{"*.azurecr.io", "azurecr.io/app", false},
		{"*.azurecr.io", "a.b.azurecr.io/app", false},
		{"*-docker.pkg.dev", "europe-docker.pkg.dev/p/r/i", true},
		{"registry.test:5000", "registry.test:5000/app", true},
		{"registry.test:5000", "registry.test/app", false},
		{"registry.test", "registry.test:5000/app", false},
		{"registry.test/team", "registry.test/team/app", true},
		{"registry.test/team", "registry.test/other/app", false},
		{"REGISTRY.test", "registry.test/app", false},
		{"[", "registry.test/app", false},
	}
	for _, tt := range tests {
		if got := credprovider.URLsMatch(tt.glob, tt.target); got != tt.want {
			t.Errorf("URLsMatch(%q, %q) = %v, want %v", tt.glob, tt.target, got, tt.want)
		}
	}
}

// setup writes a CredentialProviderConfig naming one plugin "fake-plugin"
// (the real fake binary) with the given env and returns config path, bin dir
// and the plugin's request log.
func setup(t *testing.T, matchImages, env string, defaultCache string) (cfg, bin, log string) {
	t.Helper()
	dir := t.TempDir()
	bin = filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	harness.FakeBinary(t, "credprovider", bin, "fake-plugin")
	log = filepath.Join(dir, "requests.log")
	cfg = filepath.Join(dir, "credential-provider.yaml")
	body := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
- name: fake-plugin
  matchImages: [%s]
  defaultCacheDuration: %s
  apiVersion: credentialprovider.kubelet.k8s.io/v1
  args: [get-credentials, --region=test-1]
  env:
  - {name: FAKE_CP_LOG, value: %q}
%s`, matchImages, defaultCache, log, env)
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg, bin, log
}

func envLine(name, value string) string {
	return fmt.Sprintf("  - {name: %s, value: %q}\n", name, value)
}

func runs(t *testing.T, log string) []string {
	t.Helper()
	b, err := os.ReadFile(log)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

const secret = "s3cr3t-from-plugin"

var authEnv = envLine("FAKE_CP_AUTH", `{"*.registry.test": {"username": "AWS", "password": "`+secret+`"}, "other.registry.test/special": {"username": "special", "password": "x"}}`)

func TestPluginExchange(t *testing.T) {
	t.Parallel()
	cfg, bin, log := setup(t, `"*.registry.test", "*.registry.test:5000"`, authEnv, "1h")
	kc, err := credprovider.Load(cfg, bin)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	ac, ok, err := kc.Lookup(ctx, "one.registry.test/team/app")
	if err != nil || !ok {
		t.Fatalf("Lookup: ok=%v err=%v", ok, err)
	}
	if ac.Username != "AWS" || ac.Password != secret {
		t.Fatalf("credentials = %q/%q", ac.Username, ac.Password)
	}
	got := runs(t, log)
	if len(got) != 1 {
		t.Fatalf("plugin runs = %d, want 1: %q", len(got), got)
	}
	for _, want := range []string{`"apiVersion":"credentialprovider.kubelet.k8s.io/v1"`, `"kind":"CredentialProviderRequest"`, `"image":"one.registry.test/team/app"`, "get-credentials --region=test-1"} {
		if !strings.Contains(got[0], want) {
			t.Errorf("request %q lacks %q", got[0], want)
		}
	}
	// Most specific auth key wins, as in the kubelet's keyring.
	ac, ok, err = kc.Lookup(ctx, "other.registry.test/special/app")
	if err != nil || !ok || ac.Username != "special" {
		t.Fatalf("Lookup special: %q ok=%v err=%v", ac.Username, ok, err)
	}
	// No matchImages match: the plugin never runs.
	before := len(runs(t, log))
	if _, ok, err := kc.Lookup(ctx, "registry.test/app"); ok || err != nil {
		t.Fatalf("Lookup of unmatched image: ok=%v err=%v", ok, err)
	}
	if _, ok, err := kc.Lookup(ctx, "one.registry.test:5001/app"); ok || err != nil {
		t.Fatalf("Lookup on another port: ok=%v err=%v", ok, err)
	}
	if n := len(runs(t, log)); n != before {
		t.Fatalf("plugin ran for unmatched images: %d runs, want %d", n, before)
	}
	// As a keychain, per repository.
	repo, err := name.NewRepository("one.registry.test/team/app")
	if err != nil {
		t.Fatal(err)
	}
	a, err := authn.Resolve(ctx, kc, repo)
	if err != nil {
		t.Fatal(err)
	}
	cfgA, err := a.Authorization()
	if err != nil || cfgA.Password != secret {
		t.Fatalf("keychain authorization: %v", err)
	}
}

func TestPluginCache(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, keyType, respDuration, defaultCache string
		lookups                                   []string
		advance                                   time.Duration // before the last lookup
		wantRuns                                  int
	}{
		{"registry key shares a host", "Registry", "", "1h", []string{"a.registry.test/x", "a.registry.test/y", "a.registry.test/x"}, 0, 1},
		{"registry key per host", "Registry", "", "1h", []string{"a.registry.test/x", "b.registry.test/x"}, 0, 2},
		{"image key per image", "Image", "", "1h", []string{"a.registry.test/x", "a.registry.test/y", "a.registry.test/x"}, 0, 2},
		{"global key", "Global", "", "1h", []string{"a.registry.test/x", "b.registry.test/y"}, 0, 1},
		{"response duration over default", "Registry", "1m", "1h", []string{"a.registry.test/x", "a.registry.test/x"}, 2 * time.Minute, 2},
		{"still fresh", "Registry", "10m", "1h", []string{"a.registry.test/x", "a.registry.test/x"}, 2 * time.Minute, 1},
		{"default duration expires", "Registry", "", "1m", []string{"a.registry.test/x", "a.registry.test/x"}, 2 * time.Minute, 2},
		{"zero duration: never cached", "Registry", "", "0s", []string{"a.registry.test/x", "a.registry.test/x"}, 0, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			env := authEnv + envLine("FAKE_CP_CACHE_KEY_TYPE", tt.keyType)
			if tt.respDuration != "" {
				env += envLine("FAKE_CP_CACHE_DURATION", tt.respDuration)
			}
			cfg, bin, log := setup(t, `"*.registry.test"`, env, tt.defaultCache)
			var now atomic.Int64
			now.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
			kc, err := credprovider.Load(cfg, bin, credprovider.WithClock(func() time.Time { return time.Unix(0, now.Load()) }))
			if err != nil {
				t.Fatal(err)
			}
			for i, img := range tt.lookups {
				if i == len(tt.lookups)-1 {
					now.Add(int64(tt.advance))
				}
				if _, ok, err := kc.Lookup(t.Context(), img); !ok || err != nil {
					t.Fatalf("Lookup(%s): ok=%v err=%v", img, ok, err)
				}
			}
			if got := len(runs(t, log)); got != tt.wantRuns {
				t.Fatalf("plugin runs = %d, want %d", got, tt.wantRuns)
			}
		})
	}
}

func TestPluginConcurrentLookupsRunOnce(t *testing.T) {
	t.Parallel()
	cfg, bin, log := setup(t, `"*.registry.test"`, authEnv, "1h")
	kc, err := credprovider.Load(cfg, bin)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if _, ok, err := kc.Lookup(t.Context(), "a.registry.test/x"); !ok || err != nil {
				t.Errorf("Lookup: ok=%v err=%v", ok, err)
			}
		})
	}
	wg.Wait()
	if got := len(runs(t, log)); got != 1 {
		t.Fatalf("plugin runs = %d, want 1", got)
	}
}

func TestPluginFailures(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, env, wantErr string
	}{
		{"plugin fails", envLine("FAKE_CP_FAIL", "1"), "exit status 1"},
		{"wrong response apiVersion", envLine("FAKE_CP_API_VERSION", "credentialprovider.kubelet.k8s.io/v1beta1"), "response apiVersion"},
		{"bad cacheKeyType", envLine("FAKE_CP_CACHE_KEY_TYPE", "Node"), "invalid cacheKeyType"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, bin, _ := setup(t, `"*.registry.test"`, authEnv+tt.env, "1h")
			kc, err := credprovider.Load(cfg, bin)
			if err != nil {
				t.Fatal(err)
			}
			_, ok, err := kc.Lookup(t.Context(), "a.registry.test/x")
			if ok || err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Lookup: ok=%v err=%v, want error %q", ok, err, tt.wantErr)
			}
			if strings.Contains(err.Error(), secret) {
				t.Fatalf("error carries the secret: %v", err)
			}
		})
	}
}

func TestPluginTimeout(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bin, "slow"), []byte("#!/bin/sh\nexec sleep 60\n"), 0o755); err != nil { //nolint:gosec // test plugin
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "c.yaml")
	if err := os.WriteFile(cfg, []byte(`{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"slow","matchImages":["*.registry.test"],"defaultCacheDuration":"1m","apiVersion":"credentialprovider.kubelet.k8s.io/v1"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	kc, err := credprovider.Load(cfg, bin, credprovider.WithTimeout(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, _, err = kc.Lookup(context.Background(), "a.registry.test/x")
	if err == nil || !strings.Contains(err.Error(), "deadline exceeded") {
		t.Fatalf("Lookup error = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("timeout took %v", d)
	}
}

func TestLoadRejects(t *testing.T) {
	t.Parallel()
	provider := func(fields string) string {
		return `apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
- ` + fields
	}
	ok := `name: fake-plugin
  matchImages: ["*.registry.test"]
  defaultCacheDuration: 1m
  apiVersion: credentialprovider.kubelet.k8s.io/v1`
	tests := []struct {
		name, body, wantErr string
	}{
		{"valid", provider(ok), ""},
		{"no providers", "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders: []\n", "no providers"},
		{"wrong kind", "apiVersion: kubelet.config.k8s.io/v1\nkind: KubeletConfiguration\nproviders: []\n", "kind"},
		{"unknown field", provider(ok + "\n  bogus: 1"), "unknown field"},
		{"path name", provider(strings.Replace(ok, "fake-plugin", "../fake-plugin", 1)), "must not be a path"},
		{"no matchImages", provider(strings.Replace(ok, `matchImages: ["*.registry.test"]`, "matchImages: []", 1)), "matchImages is required"},
		{"no cache duration", provider(strings.Replace(ok, "defaultCacheDuration: 1m", "args: []", 1)), "defaultCacheDuration is required"},
		{"negative cache duration", provider(strings.Replace(ok, "1m", "-1m", 1)), "must not be negative"},
		{"bad apiVersion", provider(strings.Replace(ok, "kubelet.k8s.io/v1", "kubelet.k8s.io/v2", 1)), "unsupported apiVersion"},
		{"missing binary", provider(strings.Replace(ok, "fake-plugin", "absent-plugin", 1)), "no such file"},
		{"duplicate", provider(ok + "\n- " + ok), "duplicate provider name"},
		{"scheme in matchImages", provider(strings.Replace(ok, `"*.registry.test"`, `"https://registry.test"`, 1)), "must not have a scheme"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			harness.FakeBinary(t, "credprovider", dir, "fake-plugin")
			cfg := filepath.Join(dir, "c.yaml")
			if err := os.WriteFile(cfg, []byte(tt.body), 0o600); err != nil {
				t.Fatal(err)
			}
			kc, err := credprovider.Load(cfg, dir)
			if tt.wantErr == "" {
				if err != nil || len(kc.Providers()) != 1 {
					t.Fatalf("Load: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Load error = %v, want %q", err, tt.wantErr)
			}
		})
	}
}
