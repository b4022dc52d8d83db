package harness

import (
	"testing"

	"github.com/pinwarden/pinwarden/cri"
)

// Node is what most integration tests start with: a private containerd
// (StartContainerd, either line), an in-process registry it pulls from over
// plain HTTP (a CountingRegistry: it can be counted and taken down), and
// pinwarden's CRI client dialled to the daemon.
type Node struct {
	// Registry is the node's in-process registry (Registry.Host is its
	// host:port).
	Registry *CountingRegistry
	// Containerd is the daemon; Kill/Start/Restart it to test outages.
	Containerd *Containerd
	// CRI is a client on the daemon's socket (namespace k8s.io), closed when
	// the test ends.
	CRI *cri.Client
}

// StartNode starts a registry and a containerd that reaches it (plus any
// registry named with WithInsecureRegistry) and dials the CRI client with
// the cri options of WithCRI.
func StartNode(t testing.TB, opts ...Option) *Node {
	t.Helper()
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	reg := StartCountingRegistry(t)
	ctd := StartContainerd(t, append([]Option{WithInsecureRegistry(reg.Host)}, opts...)...)
	return &Node{Registry: reg, Containerd: ctd, CRI: DialCRI(t, ctd, o.cri...)}
}

// WithCRI passes options to the CRI client of StartNode (e.g.
// cri.WithRuntimeService with a fake for containers, which cannot run here).
func WithCRI(opts ...cri.Option) Option {
	return func(o *options) { o.cri = append(o.cri, opts...) }
}

// DialCRI dials pinwarden's CRI client to ctd (namespace k8s.io) and closes
// it when the test ends.
func DialCRI(t testing.TB, ctd *Containerd, opts ...cri.Option) *cri.Client {
	t.Helper()
	c, err := cri.Dial(t.Context(), ctd.Endpoint(), "k8s.io", opts...)
	if err != nil {
		t.Fatalf("dial containerd: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}
