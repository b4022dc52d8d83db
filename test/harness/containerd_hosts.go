package harness

import (
	"os"
	"path/filepath"
)

// HostsDir is the daemon's registry hosts directory (containerd's
// config_path, the certs.d that pinwarden reads as registries.containerdHostsDir).
func (c *Containerd) HostsDir() string { return c.certsD }

// WriteHostsTOML writes certs.d/<host>/hosts.toml (host or host:port, in
// containerd's host_port_ directory form); containerd reads it at the next pull.
func (c *Containerd) WriteHostsTOML(host, body string) {
	c.t.Helper()
	d := filepath.Join(c.certsD, hostDirName(host))
	if err := os.MkdirAll(d, 0o755); err != nil {
		c.t.Fatalf("certs.d/%s: %v", host, err)
	}
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(body), 0o644); err != nil { //nolint:gosec // containerd's config, not secret
		c.t.Fatalf("hosts.toml for %s: %v", host, err)
	}
}

// hostDirName is containerd's directory name for host: ":port" becomes "_port_".
func hostDirName(host string) string {
	for i := len(host) - 1; i > 0; i-- {
		if host[i] == ':' {
			return host[:i] + "_" + host[i+1:] + "_"
		}
	}
	return host
}
