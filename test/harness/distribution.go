package harness

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// DistributionOptions configure StartDistributionWith: the Debian
// distribution registry with TLS, htpasswd or token auth, or as a
// pull-through mirror.
type DistributionOptions struct {
	// TLS serves HTTPS with this certificate (from a test CA).
	TLS *Issued
	// Htpasswd turns on basic auth for these users (name -> password).
	Htpasswd map[string]string
	// Token turns on token auth: the registry trusts tokens that the
	// token server signs (see StartTokenFront).
	Token *TokenAuth
	// ProxyRemoteURL makes it a pull-through cache of that registry.
	ProxyRemoteURL, ProxyUsername, ProxyPassword string
	// Seed also starts an open, plain-HTTP instance on the same storage, so
	// tests can push and sign without credentials (Distribution.SeedHost).
	Seed bool
}

// TokenAuth is distribution's auth.token section.
type TokenAuth struct {
	Realm, Service, Issuer, RootCertBundle string
}

// Distribution is a running distribution registry.
type Distribution struct {
	// Host is host:port of the registry under test.
	Host string
	// SeedHost is host:port of the open instance on the same storage ("" unless Seed).
	SeedHost string
	// DataDir is the filesystem storage root.
	DataDir string

	mu    sync.Mutex
	stops []func()
}

// Stop kills the registry (and its seed instance) now.
func (d *Distribution) Stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.stops {
		s()
	}
	d.stops = nil
}

// WaitBlobStored waits until the registry's storage holds blob digest
// ("sha256:<hex>"): a pull-through cache stores blobs after serving them.
func (d *Distribution) WaitBlobStored(t testing.TB, digest string) {
	t.Helper()
	hex := strings.TrimPrefix(digest, "sha256:")
	p := filepath.Join(d.DataDir, "docker", "registry", "v2", "blobs", "sha256", hex[:2], hex, "data")
	Eventually(t, 20*time.Second, "blob "+digest+" stored", func() (bool, string) {
		_, err := os.Stat(p)
		return err == nil, fmt.Sprint(err)
	})
}

// StartDistributionWith starts distribution with o on a free loopback port
// and waits until /v2/ answers (200 or 401).
func StartDistributionWith(t testing.TB, o DistributionOptions) *Distribution {
	t.Helper()
	SkipShort(t, "the distribution registry")
	bin := DistributionBin
	if v := os.Getenv("PINWARDEN_DISTRIBUTION_BIN"); v != "" {
		bin = v
	}
	RequireBinary(t, bin)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	d := &Distribution{Host: fmt.Sprintf("127.0.0.1:%d", freePort(t)), DataDir: data}
	var b strings.Builder
	fmt.Fprintf(&b, "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\n", data)
	fmt.Fprintf(&b, "http:\n  addr: %s\n", d.Host)
	if o.TLS != nil {
		fmt.Fprintf(&b, "  tls:\n    certificate: %s\n    key: %s\n", o.TLS.CertPath, o.TLS.KeyPath)
	}
	switch {
	case o.Htpasswd != nil:
		var hp strings.Builder
		for u, p := range o.Htpasswd {
			h, err := bcrypt.GenerateFromPassword([]byte(p), bcrypt.MinCost)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(&hp, "%s:%s\n", u, h)
		}
		hpPath := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(hpPath, []byte(hp.String()), 0o600); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "auth:\n  htpasswd:\n    realm: pinwarden-test\n    path: %s\n", hpPath)
	case o.Token != nil:
		fmt.Fprintf(&b, "auth:\n  token:\n    realm: %s\n    service: %s\n    issuer: %s\n    rootcertbundle: %s\n",
			o.Token.Realm, o.Token.Service, o.Token.Issuer, o.Token.RootCertBundle)
	}
	if o.ProxyRemoteURL != "" {
		fmt.Fprintf(&b, "proxy:\n  remoteurl: %s\n", o.ProxyRemoteURL)
		if o.ProxyUsername != "" {
			fmt.Fprintf(&b, "  username: %s\n  password: %s\n", o.ProxyUsername, o.ProxyPassword)
		}
	}
	scheme := "http"
	client := http.DefaultClient
	if o.TLS != nil {
		scheme = "https"
		client = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} // readiness probe only
	}
	d.stops = append(d.stops, runDistribution(t, bin, filepath.Join(dir, "main"), b.String(), scheme+"://"+d.Host, client))
	if o.Seed {
		d.SeedHost = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		seed := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n", data, d.SeedHost)
		d.stops = append(d.stops, runDistribution(t, bin, filepath.Join(dir, "seed"), seed, "http://"+d.SeedHost, http.DefaultClient))
	}
	t.Cleanup(d.Stop)
	return d
}

// runDistribution starts one distribution process with cfg and returns its stop.
func runDistribution(t testing.TB, bin, dir, cfg, base string, client *http.Client) func() {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "registry.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
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
	var once sync.Once
	stop := func() {
		once.Do(func() {
			_ = cmd.Process.Kill()
			<-done
			if t.Failed() {
				b, _ := os.ReadFile(logPath)
				t.Logf("distribution log (%s):\n%s", base, b)
			}
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v2/", nil)
		resp, err := client.Do(req)
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return stop
			}
		}
		select {
		case <-done:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("distribution exited during start:\n%s\nconfig:\n%s", b, cfg)
		case <-ctx.Done():
			stop()
			t.Fatalf("distribution on %s not ready: %v", base, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TokenFront is a TLS server that answers /token as a registry token
// service (docker token auth, ES256 JWTs with an x5c chain from a test CA;
// GET with basic auth, and the OAuth2 password grant that containerd POSTs)
// and forwards everything else to a registry behind it: a registry with a
// bearer token flow on one host, like Harbor or GitLab's.
type TokenFront struct {
	// Host is host:port of the front.
	Host string
	// Auth is the auth section the registry behind must use.
	Auth *TokenAuth
	// Tokens counts issued tokens; Requests counts every request to the front.
	Tokens, Requests atomic.Int64

	users  map[string]string
	signer Issued
	ln     net.Listener
	srv    *http.Server
}

// NewTokenFront reserves the front's port and its signing certificate;
// start the registry with Auth, then call Serve with its host.
// Authenticated users (name -> password) get pull (and push) on every
// repository; anonymous requests get a token without access.
func NewTokenFront(t testing.TB, ca *CA, users map[string]string) *TokenFront {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &TokenFront{Host: ln.Addr().String(), users: users, signer: ca.Issue("token-signer"), ln: ln}
	f.Auth = &TokenAuth{Realm: "https://" + f.Host + "/token", Service: "pinwarden-test-registry", Issuer: "pinwarden-test-issuer", RootCertBundle: ca.CertPath}
	return f
}

// Serve starts forwarding to the plain-HTTP registry at backend, serving
// TLS with cert. It stops when the test ends.
func (f *TokenFront) Serve(t testing.TB, backend string, cert Issued) {
	t.Helper()
	target, _ := url.Parse("http://" + backend)
	proxy := httputil.NewSingleHostReverseProxy(target)
	mux := http.NewServeMux()
	mux.HandleFunc("/token", f.token)
	mux.Handle("/", proxy)
	f.srv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			f.Requests.Add(1)
			mux.ServeHTTP(w, r)
		}),
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert.TLS}},
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() { _ = f.srv.ServeTLS(f.ln, "", "") }()
	t.Cleanup(func() { _ = f.srv.Close() })
}

// token answers both ways clients ask for a token: GET with basic auth
// (go-containerregistry, docker) and the OAuth2 password grant, a form POST
// with username and password (containerd, when it has credentials; other
// grants get 400, on which containerd falls back to GET).
func (f *TokenFront) token(w http.ResponseWriter, r *http.Request) {
	user, pass, ok := r.BasicAuth()
	scopes, service := r.URL.Query()["scope"], r.URL.Query().Get("service")
	if r.Method == http.MethodPost {
		if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "password" {
			http.Error(w, `{"error":"unsupported_grant_type"}`, http.StatusBadRequest)
			return
		}
		user, pass, ok = r.PostForm.Get("username"), r.PostForm.Get("password"), true
		scopes, service = strings.Fields(r.PostForm.Get("scope")), r.PostForm.Get("service")
	}
	authed := ok && f.users[user] != "" && f.users[user] == pass
	if ok && !authed {
		http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
		return
	}
	type access struct {
		Type    string   `json:"type"`
		Name    string   `json:"name"`
		Actions []string `json:"actions"`
	}
	acc := []access{}
	if authed {
		for _, scope := range scopes {
			parts := strings.Split(scope, ":")
			if len(parts) == 3 && parts[0] == "repository" {
				acc = append(acc, access{Type: "repository", Name: parts[1], Actions: strings.Split(parts[2], ",")})
			}
		}
	}
	now := time.Now()
	jti := make([]byte, 8)
	_, _ = rand.Read(jti)
	claims := map[string]any{
		"iss": f.Auth.Issuer, "sub": user, "aud": service,
		"exp": now.Add(5 * time.Minute).Unix(), "nbf": now.Add(-time.Minute).Unix(), "iat": now.Unix(),
		"jti": base64.RawURLEncoding.EncodeToString(jti), "access": acc,
	}
	tok, err := f.sign(claims)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	f.Tokens.Add(1)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"token": tok, "access_token": tok, "expires_in": 300, "issued_at": now.Format(time.RFC3339)})
}

// sign makes an ES256 JWS whose header carries the signer's certificate.
func (f *TokenFront) sign(claims map[string]any) (string, error) {
	hdr, err := json.Marshal(map[string]any{"typ": "JWT", "alg": "ES256", "x5c": []string{base64.StdEncoding.EncodeToString(f.signer.TLS.Certificate[0])}})
	if err != nil {
		return "", err
	}
	body, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	signing := base64.RawURLEncoding.EncodeToString(hdr) + "." + base64.RawURLEncoding.EncodeToString(body)
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, f.signer.TLS.PrivateKey.(*ecdsa.PrivateKey), sum[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}
