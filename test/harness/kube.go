package harness

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Binaries of the control plane. .ci/install.sh installs etcd from Debian
// (etcd-server) and builds kube-apiserver and kubectl v1.37 into GOPATH/bin.
var (
	EtcdBin          = envOr("PINWARDEN_ETCD_BIN", "/usr/bin/etcd")
	KubeAPIServerBin = envOr("PINWARDEN_KUBE_APISERVER_BIN", goBin("kube-apiserver"))
	KubectlBin       = envOr("PINWARDEN_KUBECTL_BIN", goBin("kubectl"))
)

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// adminToken is the static token of the admin user (group system:masters).
const adminToken = "pinwarden-harness-admin"

// Kube is a private control plane owned by one test: etcd and a
// kube-apiserver with RBAC on, TLS with a self-signed certificate for
// 127.0.0.1, a static admin token and service-account token signing. There
// is no controller manager, scheduler or kubelet: the helpers create what
// those would (the namespace's default ServiceAccount, Pods bound to a node).
type Kube struct {
	t   testing.TB
	dir string
	// URL is the API server's https://127.0.0.1:PORT.
	URL    string
	caPEM  []byte
	client *kubernetes.Clientset

	etcd *proc
	api  *proc
	args []string // kube-apiserver's command line, for Start after Stop
}

// proc is one child process with its log file.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func startProc(t testing.TB, name, logPath string, bin string, args ...string) (*proc, error) {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%s log: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); _ = logf.Close(); close(p.done) }()
	return p, nil
}

func (p *proc) stop() {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) tail(n int) string { return fileTail(p.log, n) }

// StartKube starts etcd and kube-apiserver and waits until the API server is
// ready. Both are stopped when the test ends; their logs are printed when it
// failed. The test is skipped when a binary is missing (failed when CI=true).
func StartKube(t testing.TB) *Kube {
	t.Helper()
	RequireBinary(t, EtcdBin)
	RequireBinary(t, KubeAPIServerBin)
	dir := t.TempDir()
	k := &Kube{t: t, dir: dir}
	t.Cleanup(func() {
		k.api.stop()
		k.etcd.stop()
		if t.Failed() {
			if k.api != nil {
				t.Logf("kube-apiserver log tail:\n%s", k.api.tail(40))
			}
			if k.etcd != nil {
				t.Logf("etcd log tail:\n%s", k.etcd.tail(20))
			}
		}
	})

	// etcd on two free loopback ports.
	clientURL := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	var err error
	k.etcd, err = startProc(t, "etcd", filepath.Join(dir, "etcd.log"), EtcdBin,
		"--name", "harness", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", clientURL, "--advertise-client-urls", clientURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "harness="+peerURL, "--log-level", "warn")
	if err != nil {
		t.Fatal(err)
	}
	Eventually(t, 30*time.Second, "etcd healthy", func() (bool, string) {
		select {
		case <-k.etcd.done:
			t.Fatalf("etcd exited:\n%s", k.etcd.tail(30))
		default:
		}
		resp, err := http.Get(clientURL + "/health")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status
	})

	// TLS, tokens and service-account keys.
	certPEM, keyPEM := selfSignedCert(t)
	k.caPEM = certPEM
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{
		"tls.crt":    certPEM,
		"tls.key":    keyPEM,
		"sa.key":     pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}),
		"sa.pub":     pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}),
		"tokens.csv": []byte(adminToken + ",admin,admin,system:masters\n"),
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	port := freePort(t)
	k.URL = fmt.Sprintf("https://127.0.0.1:%d", port)
	k.args = []string{
		"--etcd-servers", clientURL,
		"--bind-address", "127.0.0.1",
		"--secure-port", strconv.Itoa(port),
		"--tls-cert-file", filepath.Join(dir, "tls.crt"), "--tls-private-key-file", filepath.Join(dir, "tls.key"),
		"--token-auth-file", filepath.Join(dir, "tokens.csv"),
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/16",
		"--cert-dir", filepath.Join(dir, "certs"),
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--v=0",
	}
	rc := k.AdminConfig()
	k.client, err = kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	k.Start()
	return k
}

// Start starts the API server (again, after Stop) and waits until it is
// ready and RBAC's bootstrap roles exist.
func (k *Kube) Start() {
	k.t.Helper()
	if k.api != nil {
		select {
		case <-k.api.done:
		default:
			k.t.Fatal("kube-apiserver is already running")
		}
	}
	var err error
	k.api, err = startProc(k.t, "kube-apiserver", filepath.Join(k.dir, "kube-apiserver.log"), KubeAPIServerBin, k.args...)
	if err != nil {
		k.t.Fatal(err)
	}
	api := k.api
	Eventually(k.t, 120*time.Second, "kube-apiserver ready", func() (bool, string) {
		select {
		case <-api.done:
			k.t.Fatalf("kube-apiserver exited:\n%s", api.tail(40))
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		body, err := k.client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return false, err.Error()
		}
		// The bootstrap ClusterRoles are created by a post-start hook that
		// readyz waits for; view is one of them.
		if _, err := k.client.RbacV1().ClusterRoles().Get(ctx, "view", metav1.GetOptions{}); err != nil {
			return false, err.Error()
		}
		return true, string(body)
	})
}

// Stop stops the API server (etcd keeps running), like an outage.
func (k *Kube) Stop() { k.api.stop() }

// AdminConfig is a client config for the admin user.
func (k *Kube) AdminConfig() *rest.Config {
	return &rest.Config{
		Host:            k.URL,
		BearerToken:     adminToken,
		TLSClientConfig: rest.TLSClientConfig{CAData: k.caPEM},
		QPS:             50, Burst: 100,
		Timeout: 30 * time.Second,
	}
}

// Client is a clientset of the admin user.
func (k *Kube) Client() kubernetes.Interface { return k.client }

// Namespace creates namespace ns (when absent) with its default
// ServiceAccount, which Pods need and which no controller manager creates
// here.
func (k *Kube) Namespace(ns string) {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := k.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		k.t.Fatalf("create namespace %s: %v", ns, err)
	}
	k.ServiceAccount(ns, "default")
}

// ServiceAccount creates the ServiceAccount ns/name when absent.
func (k *Kube) ServiceAccount(ns, name string) {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := k.client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		k.t.Fatalf("create serviceaccount %s/%s: %v", ns, name, err)
	}
}

// Node creates a Node object named name (there is no kubelet to register
// one) and returns it.
func (k *Kube) Node(name string) *corev1.Node {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := k.client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name,
		Labels: map[string]string{"kubernetes.io/hostname": name}}}, metav1.CreateOptions{})
	if err != nil {
		k.t.Fatalf("create node %s: %v", name, err)
	}
	return n
}

// Kubectl runs kubectl v1.37 as the admin user with args, stdin as its
// input, and returns its combined output; a non-zero exit is an error.
func (k *Kube) Kubectl(stdin []byte, args ...string) (string, error) {
	k.t.Helper()
	RequireBinary(k.t, KubectlBin)
	kc := filepath.Join(k.dir, "admin.kubeconfig")
	if _, err := os.Stat(kc); err != nil {
		k.WriteKubeconfig(kc, adminToken)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, KubectlBin, append([]string{"--kubeconfig", kc}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Apply applies YAML manifests (kubectl apply -f -) as the admin user;
// extra arguments are added (e.g. "--dry-run=server").
func (k *Kube) Apply(manifests []byte, extra ...string) string {
	k.t.Helper()
	out, err := k.Kubectl(manifests, append([]string{"apply", "-f", "-"}, extra...)...)
	if err != nil {
		k.t.Fatal(err)
	}
	return out
}

// Token mints a token for the ServiceAccount ns/name through the
// TokenRequest API, valid for an hour.
func (k *Kube) Token(ns, name string) string {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	exp := int64(3600)
	tr, err := k.client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		k.t.Fatalf("token for %s/%s: %v", ns, name, err)
	}
	return tr.Status.Token
}

// WriteKubeconfig writes a kubeconfig at path that reaches this API server
// with token.
func (k *Kube) WriteKubeconfig(path, token string) {
	k.t.Helper()
	ca := filepath.Join(filepath.Dir(path), filepath.Base(path)+".ca.crt")
	if err := os.WriteFile(ca, k.caPEM, 0o600); err != nil {
		k.t.Fatal(err)
	}
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: harness
  cluster: {server: %q, certificate-authority: %q}
users:
- name: harness
  user: {token: %q}
contexts:
- name: harness
  context: {cluster: harness, user: harness}
current-context: harness
`, k.URL, ca, token)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		k.t.Fatal(err)
	}
}

// WriteAdminKubeconfig writes a kubeconfig at path for the admin user.
func (k *Kube) WriteAdminKubeconfig(path string) { k.WriteKubeconfig(path, adminToken) }

// selfSignedCert returns a self-signed ECDSA serving certificate for
// 127.0.0.1 and localhost, and its key, both PEM.
func selfSignedCert(t testing.TB) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}
