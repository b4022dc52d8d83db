package agent

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

// TestRunPrefetchesPins: the agent, with prefetch enabled, pulls a signed
// pin, never the unsigned one, and picks up a pin added to the pin file
// while it runs (reload -> SetPins).
func TestRunPrefetchesPins(t *testing.T) {
	t.Parallel()
	reg := harness.StartRegistry(t)
	ctd := harness.StartContainerd(t, harness.WithInsecureRegistry(reg))
	s := harness.NewSigner(t)
	push := func(repo string, signed bool) string {
		d := harness.PushRandomImage(t, reg+"/"+repo+":v1", 2048)
		if signed {
			s.Sign(t, reg+"/"+repo, d)
		}
		return reg + "/" + repo + "@" + d
	}
	signed, unsigned, later := push("agent/signed", true), push("agent/unsigned", false), push("agent/later", true)

	dir := t.TempDir()
	pinFile := filepath.Join(dir, "pins.txt")
	if err := os.WriteFile(pinFile, []byte(signed+"\n"+unsigned+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	metricsAddr := harness.FreeAddr(t)
	cfg := harness.AgentConfig(ctd.Endpoint(), filepath.Join(dir, "state"))
	cfg.MetricsAddress = metricsAddr
	cfg.Registries.Insecure = []string{reg}
	cfg.Policies = []config.Policy{harness.KeyPolicy("signed", reg+"/**", s.PubPath)}
	cfg.Pins = []string{pinFile}
	cfg.Prefetch.Enabled = true
	cfgPath := harness.WriteConfig(t, filepath.Join(dir, "config.yaml"), cfg)
	runAgent(t, cfgPath)

	c, err := cri.Dial(t.Context(), ctd.Endpoint(), "k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitPresent := func(ref string) {
		t.Helper()
		harness.Eventually(t, 60*time.Second, ref+" prefetched", func() (bool, string) {
			st, err := c.ImageStatus(t.Context(), ref)
			return err == nil && st != nil, fmt.Sprintf("image status %+v, %v", st, err)
		})
	}
	waitPresent(signed)
	if err := os.WriteFile(pinFile, []byte(signed+"\n"+unsigned+"\n"+later+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	waitPresent(later)
	// The unsigned pin's attempt is over (rejected) before its absence is
	// checked; a check before that would pass whatever the agent does.
	harness.Eventually(t, 60*time.Second, "the unsigned pin rejected", func() (bool, string) {
		v, err := metric(t.Context(), metricsAddr, `pinwarden_prefetch_total{result="rejected"}`)
		return err == nil && v >= 1, fmt.Sprintf("%v, %v", v, err)
	})
	if st, err := c.ImageStatus(t.Context(), unsigned); err != nil || st != nil {
		t.Errorf("unsigned pin on the node: %+v %v", st, err)
	}
}

// metric reads one series (name{labels} as exposed) from the agent's /metrics.
func metric(ctx context.Context, addr, series string) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, fmt.Errorf("no series %s", series)
}

// TestRunPrefetchDisabled: with prefetch.enabled false the agent pulls
// nothing and never asks the registry about a pin. The check waits for a
// checkpoint first: the agent has verified an image already on the node
// from the same registry, work that starts together with the prefetcher.
func TestRunPrefetchDisabled(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex // guards recording and paths
	recording, paths := false, []string{}
	regH := harness.RegistryHandler()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if recording {
			paths = append(paths, r.URL.Path)
		}
		mu.Unlock()
		regH.ServeHTTP(w, r)
	}))
	defer srv.Close()
	reg := strings.TrimPrefix(srv.URL, "http://")
	ctd := harness.StartContainerd(t, harness.WithInsecureRegistry(reg))
	s := harness.NewSigner(t)
	d := harness.PushRandomImage(t, reg+"/agent/off:v1", 2048)
	s.Sign(t, reg+"/agent/off", d)
	ref := reg + "/agent/off@" + d
	onNode := harness.PushRandomImage(t, reg+"/agent/present:v1", 2048)
	s.Sign(t, reg+"/agent/present", onNode)

	c, err := cri.Dial(t.Context(), ctd.Endpoint(), "k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.PullImage(t.Context(), reg+"/agent/present@"+onNode, nil); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	pinFile := filepath.Join(dir, "pins.txt")
	if err := os.WriteFile(pinFile, []byte(ref+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	statusAddr := harness.FreeAddr(t)
	cfg := harness.AgentConfig(ctd.Endpoint(), filepath.Join(dir, "state"))
	cfg.StatusAddress = statusAddr
	cfg.Registries.Insecure = []string{reg}
	cfg.Policies = []config.Policy{harness.KeyPolicy("signed", reg+"/**", s.PubPath)}
	cfg.Pins = []string{pinFile}
	cfgPath := harness.WriteConfig(t, filepath.Join(dir, "config.yaml"), cfg)
	mu.Lock()
	recording = true // the agent's requests only
	mu.Unlock()
	runAgent(t, cfgPath)
	harness.Eventually(t, 60*time.Second, "the image on the node verified", func() (bool, string) {
		imgs, err := status.Fetch(t.Context(), http.DefaultClient, statusAddr)
		for _, im := range imgs {
			if im.Digest == onNode {
				return im.Verdict == verdict.Verified, string(im.Verdict)
			}
		}
		return false, fmt.Sprintf("not listed (%v)", err)
	})
	if st, err := c.ImageStatus(t.Context(), ref); err != nil || st != nil {
		t.Errorf("pin pulled with prefetch disabled: %+v %v", st, err)
	}
	mu.Lock()
	defer mu.Unlock()
	sawPresent := false
	for _, p := range paths {
		sawPresent = sawPresent || strings.Contains(p, "/agent/present/")
		if strings.Contains(p, "/agent/off/") {
			t.Errorf("the registry was asked %s about the pin with prefetch disabled", p)
		}
	}
	if !sawPresent {
		t.Errorf("the registry saw no request of the agent (%v): the checkpoint proves nothing", paths)
	}
}
