package nodepull

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/pinwarden/pinwarden/test/harness"
)

// Registry names that only the test's proxy can reach: they are not
// loopback (Go never proxies loopback) and do not resolve (.test is
// reserved), so a verdict of verified proves the request went through the
// proxy, and a host in NO_PROXY must fail to resolve.
const (
	hostTLS       = "registry-a.pinwarden.test:5000"  // HTTPS, private CA in hosts.toml, htpasswd
	hostPlain     = "registry-b.pinwarden.test:5000"  // plain HTTP, registries.insecure
	hostMirrored  = "registry-c.pinwarden.test:5000"  // upstream unreachable; its hosts.toml names mirrorPlain
	mirrorPlain   = "mirror-c.pinwarden.test:5000"    // plain-HTTP mirror named in hosts.toml
	hostNoProxy   = "registry-n.pinwarden.test:5000"  // plain HTTP, in NO_PROXY
	hostNoProxyTL = "registry-ns.pinwarden.test:5000" // HTTPS via hosts.toml, in NO_PROXY
)

// TestVerifyThroughProxyFromEnvironment runs `pinwarden verify` with
// HTTPS_PROXY, HTTP_PROXY and NO_PROXY in its environment, as containerd is
// run on nodes behind an egress proxy. The proxy (CONNECT and plain
// forwarding) is the only way to the registries' names. An HTTPS registry
// with a private CA and credentials is reached by CONNECT (the proxy never
// sees the credentials), a plain-HTTP one and a plain-HTTP mirror from
// hosts.toml by forwarding; hosts in NO_PROXY never go to the proxy.
func TestVerifyThroughProxyFromEnvironment(t *testing.T) {
	harness.SkipShort(t, "the pinwarden binary, distribution")
	bin, err := harness.AgentBinary(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ca := harness.NewCA(t)
	tlsReg := harness.StartDistributionWith(t, harness.DistributionOptions{
		TLS:      ptr(ca.Issue("registry", hostname(hostTLS), hostname(hostNoProxyTL))),
		Htpasswd: map[string]string{user: pass}, Seed: true})
	plainReg := harness.StartDistributionWith(t, harness.DistributionOptions{})
	signer := harness.NewSigner(t)
	tlsDigest := harness.PushRandomImage(t, tlsReg.SeedHost+"/team/app:v1", 512)
	signer.Sign(t, tlsReg.SeedHost+"/team/app", tlsDigest)
	plainDigest := harness.PushRandomImage(t, plainReg.Host+"/team/app:v1", 512)
	signer.Sign(t, plainReg.Host+"/team/app", plainDigest)

	proxy := startForwardProxy(t, map[string]string{
		hostTLS: tlsReg.Host, hostNoProxyTL: tlsReg.Host,
		hostPlain: plainReg.Host, mirrorPlain: plainReg.Host, hostNoProxy: plainReg.Host,
	})

	dir := t.TempDir()
	certsD := filepath.Join(dir, "certs.d")
	for _, h := range []string{hostTLS, hostNoProxyTL} {
		writeHostsTOML(t, certsD, h, fmt.Sprintf("server = %q\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = %q\n",
			"https://"+h, "https://"+h, ca.CertPath))
	}
	writeHostsTOML(t, certsD, hostMirrored, fmt.Sprintf("server = %q\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n",
		"https://"+hostMirrored, "http://"+mirrorPlain))
	// Static credentials for both HTTPS names (htpasswd on the registry).
	dockerConfig := filepath.Join(dir, "config.json")
	b64 := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	harness.WriteFile(t, dockerConfig, fmt.Appendf(nil, `{"auths": {%q: {"auth": %q}, %q: {"auth": %q}}}`, hostTLS, b64, hostNoProxyTL, b64))

	cfg := harness.AgentConfig("unix:///nonexistent.sock", filepath.Join(dir, "state"))
	cfg.Registries.ContainerdHostsDir = certsD
	cfg.Registries.DockerConfig = dockerConfig
	cfg.Registries.Insecure = []string{hostPlain, hostNoProxy}
	cfg.Policies = append(cfg.Policies, harness.KeyPolicy("proxied", "**", signer.PubPath))
	cfgPath := harness.WriteConfig(t, filepath.Join(dir, "config.yaml"), cfg)

	want := map[string]string{
		hostTLS + "/team/app@" + tlsDigest:        "verified",
		hostPlain + "/team/app@" + plainDigest:    "verified",
		hostMirrored + "/team/app@" + plainDigest: "verified",
		hostNoProxy + "/team/app@" + plainDigest:  "pending",
		hostNoProxyTL + "/team/app@" + tlsDigest:  "pending",
	}
	refs := make([]string, 0, len(want))
	for r := range want {
		refs = append(refs, r)
	}
	cmd := exec.CommandContext(t.Context(), bin, append([]string{"verify", "--config", cfgPath, "--output", "json"}, refs...)...)
	cmd.Env = append(withoutProxyEnv(os.Environ()),
		"HTTPS_PROXY=http://"+proxy.addr, "HTTP_PROXY=http://"+proxy.addr,
		"NO_PROXY="+hostname(hostNoProxy)+","+hostname(hostNoProxyTL))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	// Exit status 1 is expected: the NO_PROXY hosts stay pending.
	if ee := (*exec.ExitError)(nil); err != nil && (!errors.As(err, &ee) || ee.ExitCode() != 1) {
		t.Fatalf("pinwarden verify: %v\n%s", err, stderr.String())
	}
	var rows []struct{ Image, Verdict, Reason, Detail string }
	if err := json.Unmarshal(out, &rows); err != nil {
		t.Fatalf("pinwarden verify output: %v\n%s\n%s", err, out, stderr.String())
	}
	if len(rows) != len(want) {
		t.Fatalf("%d rows, want %d: %s", len(rows), len(want), out)
	}
	for _, r := range rows {
		if r.Verdict != want[r.Image] {
			t.Errorf("%s: %s/%s (%s), want %s", r.Image, r.Verdict, r.Reason, r.Detail, want[r.Image])
		}
	}

	seen := proxy.requests()
	byHost := map[string][]proxied{}
	for _, s := range seen {
		byHost[s.host] = append(byHost[s.host], s)
	}
	for _, h := range []string{hostNoProxy, hostNoProxyTL} {
		if n := len(byHost[h]); n != 0 {
			t.Errorf("%s is in NO_PROXY but the proxy saw %d requests for it: %+v", h, n, byHost[h])
		}
	}
	if len(byHost[hostTLS]) == 0 {
		t.Errorf("the proxy saw no CONNECT to %s", hostTLS)
	}
	for _, s := range byHost[hostTLS] {
		if s.method != http.MethodConnect || s.authorization != "" {
			t.Errorf("HTTPS registry %s: the proxy saw %s with Authorization %q; want CONNECT only, credentials inside the tunnel", hostTLS, s.method, s.authorization)
		}
	}
	// TLS ran end to end inside the tunnels: the proxy saw no credentials
	// in what went through them either.
	tunnelled := proxy.tunnelled.Bytes()
	if len(tunnelled) == 0 {
		t.Error("nothing went through the CONNECT tunnels")
	}
	for _, secret := range []string{pass, b64} {
		if bytes.Contains(tunnelled, []byte(secret)) {
			t.Errorf("the credentials crossed the proxy in clear inside a CONNECT tunnel")
		}
	}
	for _, h := range []string{hostPlain, mirrorPlain} {
		if len(byHost[h]) == 0 {
			t.Errorf("the proxy forwarded no request for %s", h)
		}
		for _, s := range byHost[h] {
			if s.method != http.MethodGet && s.method != http.MethodHead {
				t.Errorf("plain-HTTP registry %s: the proxy saw %s", h, s.method)
			}
		}
	}
	if len(byHost[hostMirrored]) != 0 {
		t.Errorf("the proxy saw requests for %s, whose hosts.toml sends reads to the mirror: %+v", hostMirrored, byHost[hostMirrored])
	}
	if t.Failed() {
		t.Logf("proxy saw: %+v\npinwarden verify stderr:\n%s", seen, stderr.String())
	}
}

func hostname(hostport string) string {
	h, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return hostport
	}
	return h
}

// writeHostsTOML writes dir/<host>/hosts.toml in containerd's host_port_ form.
func writeHostsTOML(t *testing.T, dir, host, body string) {
	t.Helper()
	h, port, _ := net.SplitHostPort(host)
	d := filepath.Join(dir, h+"_"+port+"_")
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	harness.WriteFile(t, filepath.Join(d, "hosts.toml"), []byte(body))
}

// withoutProxyEnv drops the proxy variables of the test's own environment.
func withoutProxyEnv(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "REQUEST_METHOD":
			continue
		}
		out = append(out, kv)
	}
	return out
}

// proxied is one request the forward proxy received.
type proxied struct {
	method, host, authorization string
}

// forwardProxy is an HTTP proxy on loopback: CONNECT tunnels and
// absolute-URI forwarding, for the names in its map only (each to a real
// loopback address). It records every request it receives.
type forwardProxy struct {
	addr  string
	names map[string]string
	tr    *http.Transport

	mu    sync.Mutex // guards seen and conns
	seen  []proxied
	conns []net.Conn
	wg    sync.WaitGroup // tunnel copiers
	// tunnelled is every byte clients sent into CONNECT tunnels.
	tunnelled harness.LockedBuffer
}

func startForwardProxy(t *testing.T, names map[string]string) *forwardProxy {
	t.Helper()
	p := &forwardProxy{names: names, tr: &http.Transport{Proxy: nil}}
	srv := httptest.NewServer(p)
	p.addr = srv.Listener.Addr().String()
	t.Cleanup(func() {
		srv.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			_ = c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
		p.tr.CloseIdleConnections()
	})
	return p
}

func (p *forwardProxy) requests() []proxied {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]proxied(nil), p.seen...)
}

func (p *forwardProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	host := strings.ToLower(r.URL.Host)
	p.mu.Lock()
	p.seen = append(p.seen, proxied{method: r.Method, host: host, authorization: r.Header.Get("Authorization")})
	p.mu.Unlock()
	target, ok := p.names[host]
	if !ok {
		http.Error(w, "proxy: unknown host "+host, http.StatusBadGateway)
		return
	}
	if r.Method != http.MethodConnect {
		rp := &httputil.ReverseProxy{Transport: p.tr, Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme, pr.Out.URL.Host = "http", target
			pr.Out.Host = pr.In.Host
		}}
		rp.ServeHTTP(w, r)
		return
	}
	up, err := net.Dial("tcp", target)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	down, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		_ = up.Close()
		return
	}
	if _, err := io.WriteString(down, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		_ = up.Close()
		_ = down.Close()
		return
	}
	p.mu.Lock()
	p.conns = append(p.conns, up, down)
	p.wg.Add(2)
	p.mu.Unlock()
	pipe := func(dst net.Conn, src io.Reader, closeSrc net.Conn) {
		defer p.wg.Done()
		_, _ = io.Copy(dst, src)
		_ = dst.Close()
		_ = closeSrc.Close()
	}
	go pipe(up, io.TeeReader(down, &p.tunnelled), down)
	go pipe(down, up, up)
}
