package agent

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sigstore/sigstore/pkg/cryptoutils"

	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/cri"
	"github.com/pinwarden/pinwarden/test/harness"
)

func keyID(t *testing.T, pubPath string) (string, []byte) {
	t.Helper()
	b, err := os.ReadFile(pubPath)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := cryptoutils.UnmarshalPEMToPublicKey(b)
	if err != nil {
		t.Fatal(err)
	}
	id, err := policy.KeyID(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id, b
}

// TestRunWaitsForKeysThenFollowsRotation runs the agent with its signing key
// in a Secret volume:
//   - the Secret is not there at start (issue 12): the agent starts, serves
//     /healthz, reports last_reload_success 0 and judges the image pending;
//   - the Secret appears holding the wrong key: unverified;
//   - kubelet's ..data swap rotates in the right key: verified, signed by it;
//   - the key is rotated back (revoked): unverified again at once, though a
//     verified verdict is cached under the previous key (issue 10 hole 7).
func TestRunWaitsForKeysThenFollowsRotation(t *testing.T) {
	t.Parallel()
	reg := harness.StartRegistry(t)
	ctd := harness.StartContainerd(t, harness.WithInsecureRegistry(reg))
	good, wrong := harness.NewSigner(t), harness.NewSigner(t)
	goodID, goodPEM := keyID(t, good.PubPath)
	_, wrongPEM := keyID(t, wrong.PubPath)
	d := harness.PushRandomImage(t, reg+"/rotate/app:v1", 2048)
	good.Sign(t, reg+"/rotate/app", d)

	dir := t.TempDir()
	keys := &harness.SecretVolume{Dir: filepath.Join(dir, "secrets", "keys")} // not mounted yet
	metricsAddr, statusAddr := harness.FreeAddr(t), harness.FreeAddr(t)
	cfgPath := filepath.Join(dir, "config.yaml")
	cfg := fmt.Sprintf(`runtimeEndpoint: %s
stateDir: %s
metricsAddress: %q
statusAddress: %q
registries:
  insecure: [%q]
policies:
- name: signed
  images: ["%s/**"]
  keys: [secrets/keys/ci.pub]
prefetch:
  enabled: false
kubernetes:
  enabled: false
`, ctd.Endpoint(), filepath.Join(dir, "state"), metricsAddr, statusAddr, reg, reg)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	runAgent(t, cfgPath)

	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + metricsAddr + path)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	image := func() (status.Image, bool) {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		imgs, err := status.Fetch(ctx, http.DefaultClient, statusAddr)
		if err != nil {
			return status.Image{}, false
		}
		i := slices.IndexFunc(imgs, func(im status.Image) bool { return im.Digest == d })
		if i < 0 {
			return status.Image{}, false
		}
		return imgs[i], true
	}
	waitImage := func(what string, cond func(status.Image) bool) status.Image {
		t.Helper()
		var im status.Image
		harness.Eventually(t, 60*time.Second, what, func() (bool, string) {
			var ok bool
			im, ok = image()
			return ok && cond(im), fmt.Sprintf("%+v", im)
		})
		return im
	}

	// 1. No Secret: the agent is up, says so, and verifies nothing.
	harness.Eventually(t, 60*time.Second, "/healthz", func() (bool, string) {
		code, body := get("/healthz")
		return code == http.StatusOK, body
	})
	if _, body := get("/metrics"); !strings.Contains(body, "pinwarden_config_last_reload_success 0") {
		t.Fatalf("last_reload_success is not 0 without the keys:\n%s", body)
	}
	c, err := cri.Dial(t.Context(), ctd.Endpoint(), "k8s.io")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.PullImage(t.Context(), reg+"/rotate/app@"+d, nil); err != nil {
		t.Fatal(err)
	}
	harness.Eventually(t, 60*time.Second, "a judgement without keys", func() (bool, string) {
		_, body := get("/metrics")
		return strings.Contains(body, `pinwarden_verifications_total{result="error"`), "no verification counted"
	})
	// The status view is published just after the metric counts: wait for it.
	waitImage("pending without keys", func(im status.Image) bool { return im.Verdict == verdict.Pending })

	// 2. The Secret appears, with the wrong key.
	keys.Publish(t, map[string][]byte{"ci.pub": wrongPEM})
	waitImage("unverified under the wrong key", func(im status.Image) bool { return im.Verdict == verdict.Unverified })
	if _, body := get("/metrics"); !strings.Contains(body, "pinwarden_config_last_reload_success 1") {
		t.Errorf("last_reload_success is not 1 once the keys loaded")
	}

	// 3. Rotation to the right key through the ..data swap.
	before, err := LoadSettings(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	keys.Publish(t, map[string][]byte{"ci.pub": goodPEM})
	after, err := LoadSettings(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if before.Policies.Policies[0].Fingerprint == after.Policies.Policies[0].Fingerprint {
		t.Fatal("the key rotation kept the policy fingerprint")
	}
	im := waitImage("verified after the rotation", func(im status.Image) bool { return im.Verdict == verdict.Verified })
	if !slices.Equal(im.Signers, []string{goodID}) {
		t.Errorf("signers %q, want the rotated-in key %s", im.Signers, goodID)
	}

	// 4. The key is revoked (rotated back): the verdict cached under it is
	// no longer reachable.
	keys.Publish(t, map[string][]byte{"ci.pub": wrongPEM})
	waitImage("unverified after the revocation", func(im status.Image) bool { return im.Verdict == verdict.Unverified })
}

// TestRunStartsWithBrokenDockerConfig: a broken pull-secret file is waited
// for like a missing key: the agent starts and reports it, and the fixed
// file is loaded (a new registry client) without a restart.
func TestRunStartsWithBrokenDockerConfig(t *testing.T) {
	t.Parallel()
	ctd := harness.StartContainerd(t)
	s := harness.NewSigner(t)
	dir := t.TempDir()
	creds := &harness.SecretVolume{Dir: filepath.Join(dir, "pull")}
	creds.Publish(t, map[string][]byte{"config.json": []byte("{not json")})
	metricsAddr := harness.FreeAddr(t)
	cfgPath := filepath.Join(dir, "config.yaml")
	cfg := fmt.Sprintf("runtimeEndpoint: %s\nstateDir: %s\nmetricsAddress: %q\nstatusAddress: \"\"\n"+
		"registries:\n  dockerConfig: pull/config.json\npolicies:\n- name: p\n  images: [\"**\"]\n  keys: [%q]\n"+
		"prefetch:\n  enabled: false\nkubernetes:\n  enabled: false\n",
		ctd.Endpoint(), filepath.Join(dir, "state"), metricsAddr, s.PubPath)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	runAgent(t, cfgPath)
	metric := func() string {
		resp, err := http.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			return err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "pinwarden_config_last_reload_success ") {
				return l
			}
		}
		return "no pinwarden_config_last_reload_success"
	}
	harness.Eventually(t, 60*time.Second, "the agent up, reporting the broken docker config", func() (bool, string) {
		m := metric()
		return m == "pinwarden_config_last_reload_success 0", m
	})
	creds.Publish(t, map[string][]byte{"config.json": []byte(`{"auths":{}}`)})
	harness.Eventually(t, 60*time.Second, "the fixed docker config loaded", func() (bool, string) {
		m := metric()
		return m == "pinwarden_config_last_reload_success 1", m
	})
}
