package agent

import (
	"os"
	"strings"
	"testing"

	"github.com/pinwarden/pinwarden/agent/config"
)

func TestNodeName(t *testing.T) {
	host, err := os.Hostname()
	if err != nil {
		t.Skipf("no hostname on this machine: %v", err)
	}
	env := func(v string) func(string) string {
		return func(k string) string {
			if k == "NODE_NAME" {
				return v
			}
			return ""
		}
	}
	tests := []struct {
		name, cfg, env, want string
	}{
		{"config wins", "from-config", "from-env", "from-config"},
		{"then $NODE_NAME", "", "from-env", "from-env"},
		{"then the hostname", "", "", host},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := NodeName(&config.Config{NodeName: tt.cfg}, env(tt.env))
			if err != nil || got != tt.want {
				t.Fatalf("NodeName = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestKubeClientOutsideACluster(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	cfg := &config.Config{NodeName: "n", Kubernetes: config.Kubernetes{Enabled: true, Events: true}}
	_, err := kubeClient(cfg.Kubernetes)
	if err == nil || !strings.Contains(err.Error(), "kubernetes.enabled: false") {
		t.Fatalf("kubeClient outside a cluster without a kubeconfig: %v; want an error that says how to fix it", err)
	}
	cfg.Kubernetes.Enabled = false
	cs, err := kubeClient(cfg.Kubernetes)
	if cs != nil || err != nil {
		t.Fatalf("disabled Kubernetes built a client: %v, %v", cs, err)
	}
	if r, err := newReporter(cfg, cs, nil); r != nil || err != nil {
		t.Fatalf("disabled reporting built a reporter: %v, %v", r, err)
	}
}
