package e2e

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/test/harness"
)

// Images present before the agent starts get their verdicts; an image pulled
// while it runs is judged from its event, without a relist; SIGTERM stops it
// cleanly.
func TestVerdictsOnRealContainerd(t *testing.T) {
	for _, f := range harness.Flavours() {
		t.Run(f.Name, func(t *testing.T) {
			e := newEnv(t, harness.WithFlavour(f))
			other := harness.NewSigner(t)
			api, apiD := e.push("shop/api:v1", e.signer)
			worker, workerD := e.push("shop/worker:v1", nil)
			billing, billingD := e.push("shop/billing:v1", other)
			tool, toolD := e.push("thirdparty/tool:v1", e.signer)
			for _, r := range []string{api, worker, billing, tool} {
				e.pull(r)
			}
			c := e.newConfig(keyPolicy("shop", e.reg.Host+"/shop/**", e.signer), denyPolicy("third-party", e.reg.Host+"/thirdparty/**"))
			e.writeConfig(c)
			a := e.startAgent(c)

			want := map[string][2]string{
				apiD:     {"verified", ""},
				workerD:  {"unverified", "no-signature"},
				billingD: {"unverified", "invalid-signature"},
				toolD:    {"untrusted", "denied"},
			}
			for d, w := range want {
				im := a.WaitVerdict(d, 15*time.Second)
				if string(im.Verdict) != w[0] || im.Reason != w[1] {
					t.Errorf("%s: verdict %s/%q, want %s/%q", im.Image, im.Verdict, im.Reason, w[0], w[1])
				}
			}
			if im := a.Images()[apiD]; im.Policy != "shop" || len(im.Signers) != 1 || im.VerifiedAt == nil || im.Source != "registry" {
				t.Errorf("verified image lacks its evidence: %+v", im)
			}

			m := a.Metrics()
			for series, v := range map[string]float64{
				`pinwarden_images{verdict="verified"}`:   1,
				`pinwarden_images{verdict="unverified"}`: 2,
				`pinwarden_images{verdict="untrusted"}`:  1,
				`pinwarden_runtime_up`:                   1,
				`pinwarden_drifted_images`:               0,
			} {
				if m[series] != v {
					t.Errorf("%s = %v, want %v", series, m[series], v)
				}
			}
			if n := harness.SumMetric(m, "pinwarden_image_problems"); n != 3 {
				t.Errorf("pinwarden_image_problems has %v series, want 3 (worker, billing, tool)", n)
			}
			if n := harness.SumMetric(m, "pinwarden_image_problems", `digest="`+toolD+`"`, `problem="untrusted"`, `reason="denied"`, `running="false"`); n != 1 {
				t.Errorf("no untrusted/denied problem series for the third-party tool")
			}

			// A pull after start: the event, not the relist, brings the verdict
			// (the resync interval is 5 minutes; no relist may run meanwhile).
			resyncs := a.Metrics()["pinwarden_resyncs_total"]
			late, lateD := e.push("shop/late:v1", e.signer)
			start := time.Now()
			e.pull(late)
			im := a.WaitVerdict(lateD, 30*time.Second)
			took := time.Since(start)
			if im.Verdict != "verified" {
				t.Errorf("late pull: verdict %s/%s, want verified", im.Verdict, im.Reason)
			}
			t.Logf("pull returned -> verdict on /v1/images in %v (cold, loopback registry)", took)
			if n := a.Metrics()["pinwarden_resyncs_total"]; n != resyncs {
				t.Errorf("pinwarden_resyncs_total went from %v to %v: the pull was found by a relist, not its event", resyncs, n)
			}
			stop(t, a)
		})
	}
}

// A pinned tag re-pushed to another digest and pulled is flagged drifted,
// on /v1/images and /metrics, even though the new digest is signed.
func TestDriftOfPinnedTag(t *testing.T) {
	e := newEnv(t)
	web, webD := e.push("shop/web:v1", e.signer)
	e.pull(web)
	pinFile := filepath.Join(e.dir, "pins.txt")
	e.writeFile(pinFile, fmt.Sprintf("%s@%s  # release 1\n", web, webD))
	c := e.newConfig(keyPolicy("shop", e.reg.Host+"/shop/**", e.signer))
	c.Pins = []string{pinFile}
	e.writeConfig(c)
	a := e.startAgent(c)
	if im := a.WaitVerdict(webD, 15*time.Second); im.Drifted || im.Verdict != "verified" {
		t.Fatalf("pinned image before the re-push: %+v", im)
	}

	_, newD := e.push("shop/web:v1", e.signer) // the same tag, another digest
	e.pull(web)
	var im status.Image
	harness.Eventually(t, 5*time.Second, "drift flagged", func() (bool, string) {
		im = a.Images()[newD]
		return im.Drifted && im.Verdict != "pending", fmt.Sprintf("%+v", im)
	})
	if im.PinnedDigest != webD || im.Verdict != "verified" {
		t.Errorf("drifted image: pinnedDigest %s verdict %s; want %s and verified (drift is beside the verdict)", im.PinnedDigest, im.Verdict, webD)
	}
	m := a.Metrics()
	if m["pinwarden_drifted_images"] != 1 {
		t.Errorf("pinwarden_drifted_images = %v, want 1", m["pinwarden_drifted_images"])
	}
	if harness.SumMetric(m, "pinwarden_image_problems", `digest="`+newD+`"`, `problem="drifted"`, `reason="pin-mismatch"`) != 1 {
		t.Errorf("no drifted problem series for %s", newD)
	}
	if harness.SumMetric(m, "pinwarden_tag_digest", `digest="`+newD+`"`, `image="`+web+`"`) != 1 {
		t.Errorf("pinwarden_tag_digest does not show %s -> %s", web, newD)
	}
}

// A broken config or pin file is refused whole: the failure is counted, the
// agent keeps serving the verdicts of the last good config.
func TestBrokenConfigRefused(t *testing.T) {
	e := newEnv(t)
	api, apiD := e.push("shop/api:v1", e.signer)
	e.pull(api)
	pinFile := filepath.Join(e.dir, "pins.txt")
	e.writeFile(pinFile, "")
	c := e.newConfig(keyPolicy("shop", e.reg.Host+"/shop/**", e.signer))
	c.Pins = []string{pinFile}
	e.writeConfig(c)
	a := e.startAgent(c)
	a.WaitVerdict(apiD, 15*time.Second)

	good, err := os.ReadFile(e.configPath())
	if err != nil {
		t.Fatal(err)
	}
	broken := []struct {
		name, path, text, logSays string
	}{
		{"unknown key", e.configPath(), string(good) + "resyncIntervall: 5m\n", "resyncIntervall"},
		{"not YAML", e.configPath(), "policies: [\n", "config"},
		{"missing key file", e.configPath(), strings.Replace(string(good), e.signer.PubPath, "/nonexistent/cosign.pub", 1), "/nonexistent/cosign.pub"},
		{"pin without digest", pinFile, "# ok\n" + api + "\n", "pins.txt:2"},
	}
	for i, b := range broken {
		e.writeFile(b.path, b.text)
		harness.Eventually(t, 5*time.Second, b.name+" refused", func() (bool, string) {
			n := a.Metrics()[`pinwarden_config_reloads_total{result="failure"}`]
			return n == float64(i+1), fmt.Sprintf("failures=%v", n)
		})
		if !strings.Contains(a.Log(), b.logSays) {
			t.Errorf("%s: the log does not name %q", b.name, b.logSays)
		}
		if im := a.Images()[apiD]; im.Verdict != "verified" {
			t.Errorf("%s: the last good verdict was lost: %+v", b.name, im)
		}
		// Restore, so that each case is the only fault.
		if b.path == pinFile {
			e.writeFile(pinFile, "")
		} else {
			e.writeFile(e.configPath(), string(good))
		}
		harness.Eventually(t, 5*time.Second, "good config reloaded", func() (bool, string) {
			n := a.Metrics()[`pinwarden_config_reloads_total{result="success"}`]
			return n >= float64(i+2), fmt.Sprintf("successes=%v", n) // +1 for the start
		})
	}
	// The agent is still alive and ready.
	if m := a.Metrics(); m["pinwarden_runtime_up"] != 1 {
		t.Errorf("runtime_up = %v after the reloads", m["pinwarden_runtime_up"])
	}
}

// A policy change re-judges exactly the digests judged under the old
// policy: the other policy's verdicts stay, without a new verification.
func TestPolicyChangeRejudges(t *testing.T) {
	e := newEnv(t)
	opsSigner, newSigner := harness.NewSigner(t), harness.NewSigner(t)
	api, apiD := e.push("shop/api:v1", e.signer)
	tool, toolD := e.push("ops/tool:v1", opsSigner)
	e.pull(api)
	e.pull(tool)
	c := e.newConfig(keyPolicy("shop", e.reg.Host+"/shop/**", e.signer), keyPolicy("ops", e.reg.Host+"/ops/**", opsSigner))
	e.writeConfig(c)
	a := e.startAgent(c)
	a.WaitVerdict(apiD, 15*time.Second)
	before := a.WaitVerdict(toolD, 15*time.Second)
	if before.Verdict != "verified" {
		t.Fatalf("ops/tool: %+v", before)
	}
	regBefore := harness.SumMetric(a.Metrics(), "pinwarden_verifications_total", `source="registry"`)

	// shop now trusts only a key that never signed shop/api.
	c.Policies = []config.Policy{keyPolicy("shop", e.reg.Host+"/shop/**", newSigner), keyPolicy("ops", e.reg.Host+"/ops/**", opsSigner)}
	e.writeConfig(c)
	var im status.Image
	harness.Eventually(t, 5*time.Second, "shop/api re-judged", func() (bool, string) {
		im = a.Images()[apiD]
		return im.Verdict == "unverified", fmt.Sprintf("%+v", im)
	})
	if im.Reason != "invalid-signature" {
		t.Errorf("shop/api after the key change: reason %q, want invalid-signature", im.Reason)
	}
	after := a.Images()[toolD]
	if after.Verdict != "verified" || after.VerifiedAt == nil || !after.VerifiedAt.Equal(*before.VerifiedAt) {
		t.Errorf("ops/tool was re-judged although its policy did not change: before %v, after %+v", before.VerifiedAt, after)
	}
	if n := harness.SumMetric(a.Metrics(), "pinwarden_verifications_total", `source="registry"`) - regBefore; n != 1 {
		t.Errorf("%v registry verifications after the policy change, want exactly 1 (shop/api)", n)
	}

	// A new policy placed first takes ops/** over although the ops policy
	// (and its fingerprint) still exists.
	c.Policies = append([]config.Policy{denyPolicy("ops-frozen", e.reg.Host+"/ops/**")}, c.Policies...)
	e.writeConfig(c)
	harness.Eventually(t, 5*time.Second, "ops/tool taken over by the deny policy", func() (bool, string) {
		im = a.Images()[toolD]
		return im.Verdict == "untrusted" && im.Reason == "denied" && im.Policy == "ops-frozen", fmt.Sprintf("%+v", im)
	})
}

// A restart with the registry gone keeps the cached verdicts and judges
// nothing new as verified: an image pulled while the agent was down stays
// pending.
func TestRestartWithRegistryDown(t *testing.T) {
	e, c, a, apiD := startWithSignedImage(t)
	stop(t, a)

	fresh, freshD := e.push("shop/fresh:v1", e.signer) // signed, but nobody can check that now
	e.pull(fresh)
	e.reg.SetDown(true)

	b := e.startAgent(c)
	im := b.WaitVerdict(apiD, 15*time.Second)
	if im.Verdict != "verified" || im.Source != "cache" {
		t.Errorf("cached verdict after the restart: %s from %q, want verified from cache", im.Verdict, im.Source)
	}
	im = b.WaitVerdict(freshD, 30*time.Second)
	if im.Verdict != "pending" || (im.Reason != "registry-unreachable" && im.Reason != "registry-error") {
		t.Errorf("image pulled while the registry is down: %s/%s, want pending/registry-unreachable", im.Verdict, im.Reason)
	}
	m := b.Metrics()
	if n := harness.SumMetric(m, "pinwarden_verifications_total", `result="verified"`, `source="registry"`); n != 0 {
		t.Errorf("%v verified verdicts came from a registry that is down", n)
	}
	if harness.SumMetric(m, "pinwarden_image_problems", `digest="`+freshD+`"`, `problem="pending"`) != 1 {
		t.Errorf("the pending image is not a problem series")
	}

	// The registry comes back: the retry judges it without a restart.
	e.reg.SetDown(false)
	harness.Eventually(t, 30*time.Second, "retry after the registry returns", func() (bool, string) {
		im = b.Images()[freshD]
		return im.Verdict == "verified", fmt.Sprintf("%+v", im)
	})
	stop(t, b)
}

// Killing containerd flips pinwarden_runtime_up to 0 and back to 1 after it
// restarts; an image pulled around the reconnect is judged.
func TestContainerdRestart(t *testing.T) {
	e, c, a, _ := startWithSignedImage(t)

	e.ctr.Kill()
	harness.Eventually(t, 10*time.Second, "runtime_up 0", func() (bool, string) {
		v := a.Metrics()["pinwarden_runtime_up"]
		return v == 0, fmt.Sprint(v)
	})
	resp, err := httpGet("http://" + c.StatusAddress + status.Path)
	if err != nil || resp != 200 {
		t.Errorf("status API while the runtime is down: %d, %v", resp, err)
	}

	// containerd comes back and an image is pulled at once, usually before
	// the agent's backoff lets it reconnect (then only the relist after the
	// reconnect can find it; agent/inventory TestIntegrationRestart pins that
	// case down deterministically).
	e.ctr.Start()
	missed, missedD := e.push("shop/missed:v1", nil)
	e.pull(missed)
	start := time.Now()
	harness.Eventually(t, 30*time.Second, "runtime_up 1", func() (bool, string) {
		v := a.Metrics()["pinwarden_runtime_up"]
		return v == 1, fmt.Sprint(v)
	})
	im := a.WaitVerdict(missedD, 15*time.Second)
	if im.Verdict != "unverified" || im.Reason != "no-signature" {
		t.Errorf("image pulled during the outage: %s/%s, want unverified/no-signature", im.Verdict, im.Reason)
	}
	t.Logf("containerd restarted -> runtime_up 1 and the missed image judged in %v", time.Since(start).Round(time.Millisecond))
	if m := a.Metrics(); m["pinwarden_resyncs_total"] < 2 {
		t.Errorf("pinwarden_resyncs_total = %v, want a relist after the reconnect", m["pinwarden_resyncs_total"])
	}
	stop(t, a)
}

func httpGet(url string) (int, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// startWithSignedImage is a node with one signed image, shop/api:v1, and an
// agent that has verified it under the policy "shop".
func startWithSignedImage(t *testing.T) (e *env, c *config.Config, a *harness.Agent, digest string) {
	t.Helper()
	e = newEnv(t)
	api, digest := e.push("shop/api:v1", e.signer)
	e.pull(api)
	c = e.newConfig(keyPolicy("shop", e.reg.Host+"/shop/**", e.signer))
	e.writeConfig(c)
	a = e.startAgent(c)
	if im := a.WaitVerdict(digest, 15*time.Second); im.Verdict != "verified" {
		t.Fatalf("the signed image at start: %+v", im)
	}
	return e, c, a, digest
}
