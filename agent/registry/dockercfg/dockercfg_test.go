package dockercfg_test

import (
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/pinwarden/pinwarden/agent/registry/dockercfg"
	"github.com/pinwarden/pinwarden/test/harness"
)

// helperDir installs the fake helper as docker-credential-NAME for each name,
// with store as its store, and returns the directory.
func helperDir(t *testing.T, store map[string]map[string]string, names ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, n := range names {
		harness.FakeBinary(t, "credhelper", dir, "docker-credential-"+n)
	}
	b, err := json.Marshal(store)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "store.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

func helperCalls(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "calls.log"))
	if os.IsNotExist(err) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "\n")
}

func writeConfig(t *testing.T, path, body string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestLookup(t *testing.T) {
	t.Parallel()
	hd := helperDir(t, map[string]map[string]string{
		"helped.test":                 {"Username": "helper-user", "Secret": "helper-secret"},
		"store.test:5000":             {"Username": "store-user", "Secret": "store-secret"},
		"https://index.docker.io/v1/": {"Username": "<token>", "Secret": "hub-identity-token"},
	}, "fake", "store")
	cfg := `{
	  "auths": {
	    "static.test": {"auth": "` + b64("static-user:static-pass") + `"},
	    "https://split.test/v1/": {"username": "u2", "password": "p2"},
	    "helped-notfound.test": {"auth": "` + b64("fallback:fb-pass") + `"}
	  },
	  "credHelpers": {"helped.test": "fake", "helped-notfound.test": "fake", "docker.io": "store"},
	  "credsStore": "store"
	}`
	tests := []struct {
		name, host         string
		wantOK             bool
		wantUser, wantPass string
		wantToken          string
	}{
		{"credHelpers entry", "helped.test", true, "helper-user", "helper-secret", ""},
		{"credHelpers not found falls back to auths", "helped-notfound.test", true, "fallback", "fb-pass", ""},
		{"credsStore for a host without helper", "store.test:5000", true, "store-user", "store-secret", ""},
		{"docker hub identity token via helper", "index.docker.io", true, "", "", "hub-identity-token"},
		{"docker hub alias", "registry-1.docker.io", true, "", "", "hub-identity-token"},
		// credsStore answers first; it has nothing, so the static entry is used.
		{"static auth", "static.test", true, "static-user", "static-pass", ""},
		{"split username password, case-insensitive", "SPLIT.test", true, "u2", "p2", ""},
		{"nothing", "none.test", false, "", "", ""},
	}
	path := filepath.Join(t.TempDir(), "config.json")
	writeConfig(t, path, cfg)
	kc, err := dockercfg.New(path, dockercfg.WithHelperDir(hd))
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ac, ok, err := kc.Lookup(t.Context(), tt.host)
			if err != nil {
				t.Fatal(err)
			}
			if ok != tt.wantOK || ac.Username != tt.wantUser || ac.Password != tt.wantPass || ac.IdentityToken != tt.wantToken {
				t.Fatalf("Lookup(%s) = %+v ok=%v", tt.host, ac, ok)
			}
		})
	}
}

func TestHelperCacheAndReload(t *testing.T) {
	t.Parallel()
	hd := helperDir(t, map[string]map[string]string{"helped.test": {"Username": "u", "Secret": "s"}}, "fake")
	path := filepath.Join(t.TempDir(), "config.json")
	writeConfig(t, path, `{"credHelpers": {"helped.test": "fake"}, "auths": {"static.test": {"auth": "`+b64("a:one")+`"}}}`)
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	kc, err := dockercfg.New(path, dockercfg.WithHelperDir(hd), dockercfg.WithClock(func() time.Time { return time.Unix(0, now.Load()) }))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, ok, err := kc.Lookup(t.Context(), "helped.test"); !ok || err != nil {
			t.Fatalf("Lookup: ok=%v err=%v", ok, err)
		}
	}
	if n := helperCalls(t, hd); n != 1 {
		t.Fatalf("helper calls = %d, want 1 (cached)", n)
	}
	now.Add(int64(2 * time.Minute))
	if _, ok, err := kc.Lookup(t.Context(), "helped.test"); !ok || err != nil {
		t.Fatalf("Lookup: ok=%v err=%v", ok, err)
	}
	if n := helperCalls(t, hd); n != 2 {
		t.Fatalf("helper calls = %d, want 2 after the cache expired", n)
	}

	// Rotation: the file is replaced (as a Secret mount or a node agent does).
	writeConfig(t, path, `{"auths": {"static.test": {"auth": "`+b64("a:two-rotated")+`"}}}`)
	ac, ok, err := kc.Lookup(t.Context(), "static.test")
	if err != nil || !ok || ac.Password != "two-rotated" {
		t.Fatalf("after rotation: %q ok=%v err=%v", ac.Password, ok, err)
	}
	// A broken rewrite keeps the last good file.
	writeConfig(t, path, `{"auths": `)
	ac, ok, err = kc.Lookup(t.Context(), "static.test")
	if err != nil || !ok || ac.Password != "two-rotated" {
		t.Fatalf("after a broken rewrite: %q ok=%v err=%v", ac.Password, ok, err)
	}
}

func TestHelperErrorsHideOutput(t *testing.T) {
	t.Parallel()
	hd := helperDir(t, nil, "fake")
	// The fake prints its store's parse error on stdout and exits 1.
	if err := os.WriteFile(filepath.Join(hd, "store.json"), []byte(`{"leaky-secret-value`), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "config.json")
	writeConfig(t, path, `{"credHelpers": {"helped.test": "fake", "missing.test": "absent"}}`)
	kc, err := dockercfg.New(path, dockercfg.WithHelperDir(hd))
	if err != nil {
		t.Fatal(err)
	}
	_, ok, err := kc.Lookup(t.Context(), "helped.test")
	if ok || err == nil {
		t.Fatalf("Lookup with a failing helper: ok=%v err=%v", ok, err)
	}
	if strings.Contains(err.Error(), "leaky") {
		t.Fatalf("helper output leaked into the error: %v", err)
	}
	_, ok, err = kc.Lookup(t.Context(), "missing.test")
	if ok || err == nil || !strings.Contains(err.Error(), "docker-credential-absent") {
		t.Fatalf("Lookup with a missing helper: ok=%v err=%v", ok, err)
	}
	if _, err := authn.Resolve(t.Context(), kc, fakeResource("missing.test")); err == nil {
		t.Fatal("keychain hid the helper failure")
	}
}

func TestParseRejects(t *testing.T) {
	t.Parallel()
	for name, body := range map[string]string{
		"not json":      `{`,
		"bad base64":    `{"auths": {"a.test": {"auth": "%%%"}}}`,
		"no colon":      `{"auths": {"a.test": {"auth": "` + b64("nocolon") + `"}}}`,
		"helper path":   `{"credHelpers": {"a.test": "../../bin/sh"}}`,
		"store path":    `{"credsStore": "/bin/sh"}`,
		"secret quoted": `{"auths": {"a.test": {"auth": 5}}, "x": "` + "secret-in-file" + `"}`,
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "config.json")
			writeConfig(t, path, body)
			_, err := dockercfg.New(path)
			if err == nil {
				t.Fatal("New accepted a bad config")
			}
			if strings.Contains(err.Error(), "secret-in-file") {
				t.Fatalf("error quotes the file: %v", err)
			}
		})
	}
}

type fakeResource string

func (r fakeResource) String() string      { return string(r) + "/repo" }
func (r fakeResource) RegistryStr() string { return string(r) }
