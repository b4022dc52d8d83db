package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/report"
)

// NodeName resolves the node the agent reports on: the config's nodeName,
// then $NODE_NAME (the DaemonSet sets it from spec.nodeName), then the
// hostname.
func NodeName(cfg *config.Config, getenv func(string) string) (string, error) {
	if cfg.NodeName != "" {
		return cfg.NodeName, nil
	}
	if n := getenv("NODE_NAME"); n != "" {
		return n, nil
	}
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "", fmt.Errorf("no node name: set nodeName or $NODE_NAME (hostname: %w)", err)
	}
	return h, nil
}

// ReportedFile is the file in stateDir that keeps the problems already
// reported as events, so a restart does not report them again.
const ReportedFile = "reported.json"

// kubeClient builds the agent's one Kubernetes client, shared by reporting
// and pod pull secrets, from kubernetes.kubeconfig, else the in-cluster
// service account. It returns nil when kubernetes.enabled is false.
func kubeClient(k config.Kubernetes) (kubernetes.Interface, error) {
	if !k.Enabled {
		return nil, nil
	}
	var rc *rest.Config
	var err error
	if k.Kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", k.Kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
		if errors.Is(err, rest.ErrNotInCluster) {
			err = fmt.Errorf("%w: set kubernetes.kubeconfig, or kubernetes.enabled: false to run without reporting", err)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	rc.UserAgent = "pinwarden"
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return cs, nil
}

// newReporter builds the Kubernetes reporter on cs, or returns nil when
// reporting is disabled (cs is nil).
func newReporter(cfg *config.Config, cs kubernetes.Interface, logger *slog.Logger, opts ...report.Option) (*report.Reporter, error) {
	if cs == nil {
		return nil, nil
	}
	node, err := NodeName(cfg, os.Getenv)
	if err != nil {
		return nil, err
	}
	opts = append(opts, report.WithStateFile(filepath.Join(cfg.StateDir, ReportedFile)))
	return report.New(cs, node, logger, append(report.FromConfig(cfg.Kubernetes), opts...)...), nil
}
