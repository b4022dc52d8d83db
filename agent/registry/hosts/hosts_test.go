package hosts_test

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pinwarden/pinwarden/agent/registry/hosts"
	"github.com/pinwarden/pinwarden/test/harness"
)

func writeHosts(t *testing.T, root, dir, body string) {
	t.Helper()
	d := filepath.Join(root, dir)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

func summary(eps []hosts.Endpoint) string {
	var parts []string
	for _, e := range eps {
		caps := ""
		if e.Resolve {
			caps += "r"
		}
		if e.Pull {
			caps += "p"
		}
		parts = append(parts, fmt.Sprintf("%s://%s%s mirror=%v %s", e.Scheme, e.Host, e.Path, e.Mirror, caps))
	}
	return strings.Join(parts, " | ")
}

func TestEndpoints(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	writeHosts(t, root, "registry.example.com", `
server = "https://registry.example.com"
[host."https://mirror-a.example.com"]
  capabilities = ["pull", "resolve"]
[host."https://harbor.example.com/v2/proxy-cache"]
  capabilities = ["pull", "resolve"]
  override_path = true
[host."http://pull-only.example.com:5000"]
  capabilities = ["pull"]
`)
	writeHosts(t, root, "docker.io", `
[host."https://mirror.gcr.io"]
  capabilities = ["pull", "resolve"]
`)
	writeHosts(t, root, "ported.example.com_5000_", `
server = "https://other-upstream.example.com"
`)
	writeHosts(t, root, "same.example.com", `
server = "https://same.example.com"
[host."https://same.example.com"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
`)
	writeHosts(t, root, "_default", `
[host."https://default-mirror.example.com"]
  capabilities = ["pull", "resolve"]
`)
	tests := []struct {
		host, want string
	}{
		{"registry.example.com", "https://mirror-a.example.com/v2 mirror=true rp | https://harbor.example.com/v2/proxy-cache mirror=true rp | http://pull-only.example.com:5000/v2 mirror=true p | https://registry.example.com/v2 mirror=false rp"},
		{"docker.io", "https://mirror.gcr.io/v2 mirror=true rp | https://registry-1.docker.io/v2 mirror=false rp"},
		{"ported.example.com:5000", "https://other-upstream.example.com/v2 mirror=true rp"},
		{"same.example.com", "https://same.example.com/v2 mirror=false rp"},
		{"unlisted.example.com", "https://default-mirror.example.com/v2 mirror=true rp | https://unlisted.example.com/v2 mirror=false rp"},
	}
	r := hosts.New(root)
	for _, tt := range tests {
		eps, err := r.Endpoints(t.Context(), tt.host)
		if err != nil {
			t.Fatalf("Endpoints(%s): %v", tt.host, err)
		}
		if got := summary(eps); got != tt.want {
			t.Errorf("Endpoints(%s)\n got %s\nwant %s", tt.host, got, tt.want)
		}
	}
	// No hosts dir at all: the host is its own upstream, scheme left to the caller.
	eps, err := hosts.New(filepath.Join(root, "absent")).Endpoints(t.Context(), "registry.example.com")
	if err != nil || len(eps) != 1 || eps[0].Scheme != "" || eps[0].Mirror || eps[0].Transport != nil {
		t.Fatalf("no hosts dir: %+v %v", eps, err)
	}
	// A change on disk is seen at the next call.
	writeHosts(t, root, "docker.io", `
[host."https://mirror-b.example.com"]
  capabilities = ["pull", "resolve"]
[host."https://mirror-c.example.com"]
  capabilities = ["pull", "resolve"]
`)
	eps, err = r.Endpoints(t.Context(), "docker.io")
	if err != nil || len(eps) != 3 || eps[0].Host != "mirror-b.example.com" {
		t.Fatalf("after rewrite: %s %v", summary(eps), err)
	}
}

// TestEndpointTLS serves a mirror over TLS with a private CA and a required
// client certificate, and checks that only the settings of hosts.toml reach it.
func TestEndpointTLS(t *testing.T) {
	t.Parallel()
	ca := harness.NewCA(t)
	srvCert := ca.Issue("mirror")
	client := ca.Issue("client")
	var gotPath, gotHeader string
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotPath, gotHeader = r.URL.Path, r.Header.Get("X-Mirror-Token")
		io.WriteString(w, "ok")
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{srvCert.TLS}, ClientCAs: ca.Pool, ClientAuth: tls.RequireAndVerifyClientCert}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	mirror := strings.TrimPrefix(srv.URL, "https://")

	tests := []struct {
		name, body string
		wantErr    bool
	}{
		{"ca and client cert", fmt.Sprintf(`
[host."https://%s/v2/cache"]
  capabilities = ["pull", "resolve"]
  override_path = true
  ca = %q
  client = [[%q, %q]]
  [host."https://%s/v2/cache".header]
    X-Mirror-Token = "t1"
`, mirror, ca.CertPath, client.CertPath, client.KeyPath, mirror), false},
		{"no ca", fmt.Sprintf(`
[host."https://%s"]
  capabilities = ["pull", "resolve"]
  client = [[%q, %q]]
`, mirror, client.CertPath, client.KeyPath), true},
		{"skip_verify without client cert", fmt.Sprintf(`
[host."https://%s"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
`, mirror), true},
		{"skip_verify with client cert", fmt.Sprintf(`
[host."https://%s"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  client = [[%q, %q]]
`, mirror, client.CertPath, client.KeyPath), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			writeHosts(t, root, "registry.example.com", tt.body)
			r := hosts.New(root)
			eps, err := r.Endpoints(t.Context(), "registry.example.com")
			if err != nil {
				t.Fatal(err)
			}
			if eps[0].Host != mirror || !eps[0].Mirror {
				t.Fatalf("first endpoint %+v, want the mirror", eps[0])
			}
			rt := r.Transport(http.DefaultTransport)
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, "https://"+mirror+"/v2/team/app/manifests/sha256:abc", nil)
			resp, err := rt.RoundTrip(req)
			if tt.wantErr {
				if err == nil {
					resp.Body.Close()
					t.Fatal("request succeeded without the TLS settings it needs")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if tt.name == "ca and client cert" {
				if gotPath != "/v2/cache/team/app/manifests/sha256:abc" || gotHeader != "t1" {
					t.Fatalf("mirror saw path %q header %q", gotPath, gotHeader)
				}
			}
		})
	}
}
