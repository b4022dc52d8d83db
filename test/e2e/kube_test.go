package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/test/harness"
)

// apiServer stands in for the Kubernetes API server at the HTTP level (no
// kube-apiserver can run here): it serves the node and records every write.
type apiServer struct {
	URL string

	mu     sync.Mutex
	writes []string // "METHOD path body"
}

func startAPIServer(t *testing.T, node string) *apiServer {
	t.Helper()
	a := &apiServer{}
	nodeJSON := fmt.Sprintf(`{"kind":"Node","apiVersion":"v1","metadata":{"name":%q,"uid":"e2e-uid","resourceVersion":"1"},"status":{}}`, node)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		w.Header().Set("Content-Type", "application/json")
		if r.Method != http.MethodGet {
			a.mu.Lock()
			a.writes = append(a.writes, r.Method+" "+r.URL.Path+" "+string(body))
			a.mu.Unlock()
		}
		switch {
		case strings.HasSuffix(r.URL.Path, "/nodes/"+node) || strings.HasSuffix(r.URL.Path, "/nodes/"+node+"/status"):
			_, _ = io.WriteString(w, nodeJSON)
		case strings.HasSuffix(r.URL.Path, "/events") && r.Method == http.MethodPost:
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write(body)
		default:
			_, _ = io.WriteString(w, `{}`)
		}
	}))
	t.Cleanup(srv.Close)
	a.URL = srv.URL
	return a
}

func (a *apiServer) sawWrite(substrs ...string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, w := range a.writes {
		all := true
		for _, s := range substrs {
			all = all && strings.Contains(w, s)
		}
		if all {
			return true
		}
	}
	return false
}

// With kubernetes.enabled and a kubeconfig, the agent reports a denied image
// as a Warning event and in the node condition, and a refused reload as a
// ConfigInvalid event.
func TestKubernetesReporting(t *testing.T) {
	e := newEnv(t)
	api := startAPIServer(t, "e2e-node")
	kubeconfig := filepath.Join(e.dir, "kubeconfig")
	e.writeFile(kubeconfig, fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: %q}}]
users: [{name: e2e, user: {token: e2e-token}}]
contexts: [{name: e2e, context: {cluster: e2e, user: e2e}}]
current-context: e2e
`, api.URL))
	tool, toolD := e.push("thirdparty/tool:v1", e.signer)
	e.pull(tool)
	c := e.newConfig(denyPolicy("third-party", e.reg.Host+"/thirdparty/**"))
	c.Kubernetes = config.Kubernetes{Enabled: true, Kubeconfig: kubeconfig, Events: true, NodeCondition: true}
	e.writeConfig(c)
	a := e.startAgent(c)
	a.WaitVerdict(toolD, 15*time.Second)

	harness.Eventually(t, 10*time.Second, "ImageUntrusted event", func() (bool, string) {
		return api.sawWrite("/events", "ImageUntrusted", status.ShortDigest(toolD)), "no such write"
	})
	harness.Eventually(t, 10*time.Second, "node condition written", func() (bool, string) {
		return api.sawWrite("/nodes/e2e-node/status", "UntrustedImage"), "no such write"
	})

	e.writeFile(e.configPath(), string(harness.ConfigYAML(t, c))+"bogusKey: 1\n")
	harness.Eventually(t, 10*time.Second, "ConfigInvalid event", func() (bool, string) {
		return api.sawWrite("/events", "ConfigInvalid", "bogusKey"), "no such write"
	})
	api.mu.Lock()
	for _, w := range api.writes {
		if strings.Contains(w, "e2e-token") {
			t.Errorf("a request body carries the API token: %.200s", w)
		}
		var probe map[string]any
		_, body, _ := strings.Cut(strings.SplitN(w, " ", 2)[1], " ")
		if body != "" && json.Unmarshal([]byte(body), &probe) != nil {
			t.Errorf("a write is not JSON: %.200s", w)
		}
	}
	api.mu.Unlock()
	stop(t, a)
}
