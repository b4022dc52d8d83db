// Package harness starts real parts for pinwarden's tests: private containerd
// daemons (Debian's 1.6 line and the 2.x line), OCI registries (in-process
// go-containerregistry and the Debian distribution binary) and helpers that
// push small random images into them. It is also the one home of the test
// helpers every package shares, so that none is written twice:
//
//   - StartNode: containerd + registry + CRI client, the start of most
//     integration tests; StartContainerd, StartRegistry, DialCRI for the parts;
//   - CountingRegistry: a registry that counts requests (all, pinwarden's,
//     repositories in flight), can be slowed and taken down;
//   - Signer and SignDigest: cosign signatures with the cosign library;
//   - AgentConfig, KeyPolicy, DenyPolicy, WriteConfig, Parsed: agent configs
//     as typed values (config.Config), rendered to the YAML the agent reads;
//   - StartAgent / ExecAgent: the pinwarden agent binary, its /metrics,
//     /v1/images and log;
//   - Eventually: wait for a condition with a deadline (never sleep-and-check);
//   - Clock: a settable fake clock for code that takes a now func (code with
//     timers uses testing/synctest instead);
//   - RequireBinary: find a tool (containerd, crictl, cosign, promtool),
//     else skip, or fail when CI=true.
//
// Every part is owned by one test: it lives under t.TempDir(), listens on
// loopback only, and is stopped by t.Cleanup. When a binary a part needs is
// missing the test is skipped, except when the environment says CI=true: CI
// must never pass by skipping, so there the test fails instead.
package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"go/build"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/pinwarden/pinwarden/cri"
)

// Flavour is one containerd release line the tests run against.
type Flavour struct {
	// Name is used as the subtest name ("containerd-1.6", "containerd-2.4").
	Name string
	// Bin is the default binary path.
	Bin string
	// Env names the environment variable that overrides Bin.
	Env string
	// ConfigVersion is the config.toml schema the binary reads (2 or 3).
	ConfigVersion int
}

// The two containerd lines pinwarden supports.
var (
	// Containerd16 is Debian's containerd 1.6 (config version 2, CRI plugin
	// io.containerd.grpc.v1.cri).
	Containerd16 = Flavour{Name: "containerd-1.6", Bin: "/usr/bin/containerd", Env: "PINWARDEN_CONTAINERD16_BIN", ConfigVersion: 2}
	// Containerd2 is containerd 2.x (config version 3, CRI split into
	// io.containerd.cri.v1.images / runtime and the transfer service).
	Containerd2 = Flavour{Name: "containerd-2.4", Bin: goBin("containerd"), Env: "PINWARDEN_CONTAINERD_BIN", ConfigVersion: 3}
)

// goBin is the path of a tool that `.ci/install.sh` puts in $(go env GOPATH)/bin.
func goBin(name string) string { return filepath.Join(build.Default.GOPATH, "bin", name) }

// Flavours returns every containerd flavour, for tests that run one subtest
// per flavour:
//
//	for _, f := range harness.Flavours() {
//		t.Run(f.Name, func(t *testing.T) { c := harness.StartContainerd(t, harness.WithFlavour(f)) ... })
//	}
func Flavours() []Flavour { return []Flavour{Containerd16, Containerd2} }

// Binary returns the binary path for f: $f.Env when set, else f.Bin.
func (f Flavour) Binary() string {
	if v := os.Getenv(f.Env); v != "" {
		return v
	}
	return f.Bin
}

// Option configures StartContainerd.
type Option func(*options)

type options struct {
	flavour  Flavour
	insecure []string
	cri      []cri.Option // StartNode's CRI client
	sandbox  string
}

// WithSandboxImage makes ref the CRI plugin's pod sandbox ("pause") image, so
// pods can run without registry.k8s.io (see PauseImage and RunPod).
func WithSandboxImage(ref string) Option { return func(o *options) { o.sandbox = ref } }

// WithFlavour selects the containerd line (default Containerd2).
func WithFlavour(f Flavour) Option { return func(o *options) { o.flavour = f } }

// WithInsecureRegistry marks host:port registries as plain HTTP for the CRI
// plugin (a hosts.toml in the certs.d directory). More can be added later with
// AddInsecureRegistry.
func WithInsecureRegistry(hosts ...string) Option {
	return func(o *options) { o.insecure = append(o.insecure, hosts...) }
}

// Containerd is a private containerd daemon owned by one test.
//
// mu guards cmd and done; everything else is set once by StartContainerd.
type Containerd struct {
	t       testing.TB
	flavour Flavour
	bin     string
	sandbox string // the sandbox image ref, "" for the default
	dir     string // root of the daemon's files (config, root, state, log)
	sockDir string // short directory for the sockets (unix paths max 108 bytes)
	address string
	certsD  string
	logPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// RequireBinary returns the path of a tool the test needs and skips the test
// when it is missing, or fails it when CI=true (CI must never pass by
// skipping). tool is a path (an executable file there) or a command name,
// looked up on $PATH and then in $(go env GOPATH)/bin, where
// `.ci/install.sh` puts the Go tools (cosign, crane, crictl, containerd 2.x).
func RequireBinary(t testing.TB, tool string) string {
	t.Helper()
	if p, ok := findTool(tool); ok {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("required binary %s is missing (CI=true: not skipping; make tools installs it)", tool)
	}
	t.Skipf("required binary %s is missing (make tools installs it)", tool)
	return ""
}

func findTool(tool string) (string, bool) {
	executable := func(p string) bool {
		st, err := os.Stat(p)
		return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
	}
	if strings.ContainsRune(tool, filepath.Separator) {
		return tool, executable(tool)
	}
	if p, err := exec.LookPath(tool); err == nil {
		return p, true
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", false
		}
		gopath = filepath.Join(home, "go")
	}
	p := filepath.Join(filepath.SplitList(gopath)[0], "bin", tool)
	return p, executable(p)
}

// StartContainerd starts a private containerd with the native snapshotter and
// the CRI plugin, waits until its CRI image service answers, and registers a
// cleanup that kills it. The daemon's log is printed when the test fails.
func StartContainerd(t testing.TB, opts ...Option) *Containerd {
	t.Helper()
	SkipShort(t, "containerd")
	o := options{flavour: Containerd2}
	for _, opt := range opts {
		opt(&o)
	}
	bin := o.flavour.Binary()
	RequireBinary(t, bin)
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("containerd needs root (CI=true: not skipping)")
		}
		t.Skip("containerd needs root")
	}

	dir := t.TempDir()
	sockDir, err := os.MkdirTemp("", "pwctd")
	if err != nil {
		t.Fatalf("socket dir: %v", err)
	}
	c := &Containerd{
		t:       t,
		flavour: o.flavour,
		bin:     bin,
		sandbox: o.sandbox,
		dir:     dir,
		sockDir: sockDir,
		address: filepath.Join(sockDir, "c.sock"),
		certsD:  filepath.Join(dir, "certs.d"),
		logPath: filepath.Join(dir, "containerd.log"),
	}
	if err := os.MkdirAll(c.certsD, 0o755); err != nil {
		t.Fatalf("certs.d: %v", err)
	}
	for _, h := range o.insecure {
		c.AddInsecureRegistry(h)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(c.config()), 0o600); err != nil {
		t.Fatalf("containerd config: %v", err)
	}
	// Registered after t.TempDir, so it runs before the directory is removed.
	t.Cleanup(func() {
		c.kill()
		if t.Failed() {
			t.Logf("containerd (%s) log tail:\n%s", c.flavour.Name, c.LogTail(60))
		}
		_ = os.RemoveAll(c.sockDir)
	})
	if err := c.start(); err != nil {
		t.Fatalf("start %s: %v\nlog tail:\n%s", c.flavour.Name, err, c.LogTail(60))
	}
	return c
}

// config renders config.toml for the flavour.
func (c *Containerd) config() string {
	var b strings.Builder
	disabled := `["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", ` +
		`"io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"`
	if c.flavour.ConfigVersion >= 3 {
		disabled += `, "io.containerd.snapshotter.v1.erofs", "io.containerd.differ.v1.erofs", ` +
			`"io.containerd.snapshotter.v1.blockfile", "io.containerd.nri.v1.nri"`
	}
	disabled += "]"
	fmt.Fprintf(&b, "version = %d\nroot = %q\nstate = %q\ndisabled_plugins = %s\n",
		c.flavour.ConfigVersion, filepath.Join(c.dir, "root"), filepath.Join(c.dir, "state"), disabled)
	// The opt plugin would create /opt/containerd on the host.
	fmt.Fprintf(&b, "[plugins.\"io.containerd.internal.v1.opt\"]\n  path = %q\n", filepath.Join(c.dir, "opt"))
	fmt.Fprintf(&b, "[grpc]\n  address = %q\n[ttrpc]\n  address = %q\n[debug]\n  address = \"\"\n  level = \"info\"\n[metrics]\n  address = \"\"\n",
		c.address, c.address+".ttrpc")
	if c.flavour.ConfigVersion >= 3 {
		fmt.Fprintf(&b, `[plugins."io.containerd.cri.v1.images"]
  snapshotter = "native"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = %q
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "native"
`, c.certsD)
		if c.sandbox != "" {
			fmt.Fprintf(&b, "[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = %q\n", c.sandbox)
		}
	} else {
		fmt.Fprintf(&b, `[plugins."io.containerd.grpc.v1.cri"]
  disable_cgroup = true
  disable_tcp_service = true
  restrict_oom_score_adj = true%s
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = %q
`, sandboxLine(c.sandbox), c.certsD)
	}
	return b.String()
}

func sandboxLine(ref string) string {
	if ref == "" {
		return ""
	}
	return fmt.Sprintf("\n  sandbox_image = %q", ref)
}

// AddInsecureRegistry writes certs.d/HOST/hosts.toml so the CRI plugin reaches
// host (host:port) over plain HTTP. containerd reads these files on every
// pull, so it can be called while the daemon runs.
func (c *Containerd) AddInsecureRegistry(host string) {
	c.t.Helper()
	d := filepath.Join(c.certsD, host)
	if err := os.MkdirAll(d, 0o755); err != nil {
		c.t.Fatalf("certs.d/%s: %v", host, err)
	}
	toml := fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n", host, host)
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(toml), 0o644); err != nil {
		c.t.Fatalf("hosts.toml for %s: %v", host, err)
	}
}

// Address is the daemon's gRPC socket path (CRI and containerd API).
func (c *Containerd) Address() string { return c.address }

// Endpoint is Address as a unix:// URL, the form CRI clients and crictl take.
func (c *Containerd) Endpoint() string { return "unix://" + c.address }

// Flavour is the containerd line this daemon runs.
func (c *Containerd) Flavour() Flavour { return c.flavour }

// Start starts a stopped daemon on the same root, state and socket.
func (c *Containerd) Start() {
	c.t.Helper()
	if err := c.start(); err != nil {
		c.t.Fatalf("start %s: %v\nlog tail:\n%s", c.flavour.Name, err, c.LogTail(60))
	}
}

// Stop terminates the daemon (SIGTERM, then SIGKILL after 5 s) and waits.
func (c *Containerd) Stop() { c.signal(syscall.SIGTERM, 5*time.Second) }

// Kill kills the daemon with SIGKILL, like a crash, and waits.
func (c *Containerd) Kill() { c.signal(syscall.SIGKILL, 0) }

// Restart kills the daemon and starts it again.
func (c *Containerd) Restart() {
	c.t.Helper()
	c.Kill()
	c.Start()
}

func (c *Containerd) kill() { c.signal(syscall.SIGKILL, 0) }

func (c *Containerd) signal(sig syscall.Signal, grace time.Duration) {
	c.mu.Lock()
	cmd, done := c.cmd, c.done
	c.cmd, c.done = nil, nil
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	if grace > 0 {
		select {
		case <-done:
			return
		case <-time.After(grace):
			_ = cmd.Process.Kill()
		}
	}
	<-done
}

func (c *Containerd) start() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd != nil {
		return errors.New("already running")
	}
	// A killed daemon leaves its socket behind; containerd removes a stale one
	// itself, but waiting below must not see the old file.
	_ = os.Remove(c.address)
	_ = os.Remove(c.address + ".ttrpc")
	logf, err := os.OpenFile(c.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	cmd := exec.Command(c.bin, "--config", filepath.Join(c.dir, "config.toml"))
	cmd.Stdout, cmd.Stderr = logf, logf
	// Each line runs its own runc shim (containerd 2.x fails with 1.6's): the
	// one installed beside the binary comes first on PATH.
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(c.bin)+string(os.PathListSeparator)+os.Getenv("PATH"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = logf.Close()
		return fmt.Errorf("exec %s: %w", c.bin, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		_ = logf.Close()
		close(done)
	}()
	c.cmd, c.done = cmd, done

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := waitCRI(ctx, c.address, done); err != nil {
		_ = cmd.Process.Kill()
		<-done
		c.cmd, c.done = nil, nil
		return err
	}
	return nil
}

// waitCRI polls until the CRI image service on addr answers or the process
// exits.
func waitCRI(ctx context.Context, addr string, exited <-chan struct{}) error {
	conn, err := grpc.NewClient("unix://"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("grpc client: %w", err)
	}
	defer conn.Close()
	images := runtimeapi.NewImageServiceClient(conn)
	var last error
	for {
		if _, err := os.Stat(addr); err == nil {
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			_, last = images.ImageFsInfo(cctx, &runtimeapi.ImageFsInfoRequest{})
			cancel()
			if last == nil {
				return nil
			}
		}
		select {
		case <-exited:
			return errors.New("containerd exited during start")
		case <-ctx.Done():
			return fmt.Errorf("CRI on %s not ready: %w (last error: %v)", addr, ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// LogTail returns the last n lines of the daemon's log.
func (c *Containerd) LogTail(n int) string { return fileTail(c.logPath, n) }

// fileTail returns the last n lines of the file at path, or why it cannot.
func fileTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
