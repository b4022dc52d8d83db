package policy

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/sigstore/sigstore/pkg/cryptoutils"
)

func writeKey(t *testing.T, dir, name string, pub crypto.PublicKey) string {
	t.Helper()
	pem, err := cryptoutils.MarshalPublicKeyToPEM(pub)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, pem, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func genPub(t *testing.T, kind string) crypto.PublicKey {
	t.Helper()
	switch kind {
	case "p256", "p384", "p521":
		c := map[string]elliptic.Curve{"p256": elliptic.P256(), "p384": elliptic.P384(), "p521": elliptic.P521()}[kind]
		k, err := ecdsa.GenerateKey(c, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k.Public()
	case "ed25519":
		pub, _, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return pub
	case "rsa2048", "rsa1024":
		bits := map[string]int{"rsa2048": 2048, "rsa1024": 1024}[kind]
		k, err := rsa.GenerateKey(rand.Reader, bits)
		if err != nil {
			t.Fatal(err)
		}
		return k.Public()
	}
	t.Fatalf("kind %s", kind)
	return nil
}

func compileYAML(t *testing.T, y string) (*Set, error) {
	t.Helper()
	cfg, err := config.Parse([]byte(y), "")
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	return Compile(cfg)
}

func TestCompileKeys(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	keys := map[string]string{}
	for _, k := range []string{"p256", "p384", "ed25519", "rsa2048", "p521", "rsa1024"} {
		keys[k] = writeKey(t, dir, k+".pub", genPub(t, k))
	}
	garbage := filepath.Join(dir, "garbage.pub")
	if err := os.WriteFile(garbage, []byte("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big.pub")
	if err := os.WriteFile(big, make([]byte, 100<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		keys    []string
		wantErr string
	}{
		{"ecdsa p256", []string{keys["p256"]}, ""},
		{"ecdsa p384", []string{keys["p384"]}, ""},
		{"ed25519", []string{keys["ed25519"]}, ""},
		{"rsa 2048", []string{keys["rsa2048"]}, ""},
		{"all four", []string{keys["p256"], keys["p384"], keys["ed25519"], keys["rsa2048"]}, ""},
		{"p521 refused", []string{keys["p521"]}, "curve"},
		{"rsa 1024 refused", []string{keys["rsa1024"]}, "too small"},
		{"garbage PEM", []string{garbage}, "garbage.pub"},
		{"oversized file", []string{big}, "larger than"},
		{"same key twice", []string{keys["p256"], keys["p256"]}, "same public key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			y := "policies:\n- name: pol\n  images: [\"**\"]\n  keys: [" + strings.Join(tt.keys, ", ") + "]\n"
			set, err := compileYAML(t, y)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), `"pol"`) {
					t.Fatalf("err = %v, want one naming the policy and %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			p := set.Policies[0]
			if len(p.Keys) != len(tt.keys) {
				t.Fatalf("%d keys loaded", len(p.Keys))
			}
			for _, k := range p.Keys {
				if !strings.HasPrefix(k.ID, "sha256:") || len(k.ID) != 71 || k.Verifier == nil {
					t.Errorf("key %+v", k)
				}
			}
		})
	}
}

func TestFingerprint(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	k1 := writeKey(t, dir, "k1.pub", genPub(t, "p256"))
	k2 := writeKey(t, dir, "k2.pub", genPub(t, "ed25519"))
	root := filepath.Join(dir, "root.json")
	writeRoot := func(content string) {
		if err := os.WriteFile(root, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// An empty but valid trusted root.
	writeRoot(`{"mediaType":"application/vnd.dev.sigstore.trustedroot+json;version=0.1"}`)
	base := func(extra string) string {
		return "trustedRoot: " + root + "\npolicies:\n- name: p\n  images: [\"reg.example/**\"]\n  keys: [" + k1 + "]\n" + extra +
			"- name: kl\n  images: [\"kl.example/**\"]\n  keyless:\n  - issuer: https://issuer\n    subject: a@b\n"
	}
	fp := func(y string) (string, string) {
		t.Helper()
		set, err := compileYAML(t, y)
		if err != nil {
			t.Fatal(err)
		}
		return set.Policies[0].Fingerprint, set.Policies[1].Fingerprint
	}
	keyFP, klFP := fp(base(""))
	if again, _ := fp(base("")); again != keyFP {
		t.Fatal("fingerprint not stable")
	}
	for name, y := range map[string]string{
		"threshold":  base("  threshold: 1\n  tlog: true\n"),
		"second key": strings.Replace(base(""), "keys: ["+k1+"]", "keys: ["+k1+", "+k2+"]", 1),
		"glob":       strings.Replace(base(""), "reg.example/**", "reg.example/*", 1),
	} {
		if got, _ := fp(y); got == keyFP {
			t.Errorf("%s change kept the fingerprint", name)
		}
	}
	if _, got := fp(strings.Replace(base(""), "subject: a@b", "subject: c@d", 1)); got == klFP {
		t.Error("identity change kept the fingerprint")
	}
	// Key file content change.
	writeKey(t, dir, "k1.pub", genPub(t, "p256"))
	newKeyFP, sameKL := fp(base(""))
	if newKeyFP == keyFP {
		t.Error("key file change kept the fingerprint")
	}
	// Trusted root change: keyless policy changes, key-only policy without tlog does not.
	writeRoot(`{"mediaType":"application/vnd.dev.sigstore.trustedroot+json;version=0.1","tlogs":[]}`)
	k, kl := fp(base(""))
	if kl == sameKL {
		t.Error("trusted root change kept the keyless fingerprint")
	}
	if k != newKeyFP {
		t.Error("trusted root change altered a policy that does not use it")
	}
}

func TestCompileTrust(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	k := writeKey(t, dir, "k.pub", genPub(t, "p256"))
	bad := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(bad, []byte(`{"mediaType":`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := compileYAML(t, "trustedRoot: "+bad+"\npolicies: []\n"); err == nil || !strings.Contains(err.Error(), "trustedRoot") {
		t.Errorf("bad trusted root: %v", err)
	}
	// Compile also guards configs that skipped Validate.
	tlog := true
	cfg := config.Default()
	cfg.Policies = []config.Policy{{Name: "p", Images: []string{"**"}, Keys: []string{k}, Tlog: &tlog}}
	if _, err := Compile(cfg); err == nil || !strings.Contains(err.Error(), "trustedRoot") {
		t.Errorf("tlog without trusted root: %v", err)
	}
	cfg.Policies = []config.Policy{{Name: "kl", Images: []string{"**"}, Keyless: []config.Keyless{{Issuer: "https://i"}}}}
	if _, err := Compile(cfg); err == nil || !strings.Contains(err.Error(), "subject") {
		t.Errorf("keyless without subject compiled: %v", err)
	}
	cfg.Policies[0].Keyless[0].SubjectRegExp = "a("
	if _, err := Compile(cfg); err == nil {
		t.Error("invalid regexp compiled")
	}
}

func TestMatchAndDecide(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	k := writeKey(t, dir, "k.pub", genPub(t, "p256"))
	y := fmt.Sprintf(`policies:
- name: pause
  images: ["registry.k8s.io/pause"]
  ignore: true
- name: internal
  images: ["registry.example.com/**", "ghcr.io/acme/*"]
  keys: [%s]
- name: team
  images: ["registry.other.com/*/app"]
  keys: [%s]
- name: hub
  images: ["docker.io/**"]
  deny: true
`, k, k)
	set, err := compileYAML(t, y)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		repo    string
		policy  string
		verdict verdict.Verdict
		reason  string
	}{
		{"registry.k8s.io/pause", "pause", verdict.Ignored, ""},
		{"registry.k8s.io/pause/x", "", verdict.Untrusted, verdict.ReasonNoPolicy},
		{"registry.example.com/a", "internal", "", ""},
		{"registry.example.com/a/b/c", "internal", "", ""},
		{"registry.example.com.evil.io/a", "", verdict.Untrusted, verdict.ReasonNoPolicy},
		{"ghcr.io/acme/api", "internal", "", ""},
		{"ghcr.io/acme/api/sub", "", verdict.Untrusted, verdict.ReasonNoPolicy},
		{"ghcr.io/acmex/api", "", verdict.Untrusted, verdict.ReasonNoPolicy},
		{"registry.other.com/x/app", "team", "", ""},
		{"registry.other.com/x/y/app", "", verdict.Untrusted, verdict.ReasonNoPolicy},
		{"docker.io/library/nginx", "hub", verdict.Untrusted, verdict.ReasonDenied},
		{"quay.io/x", "", verdict.Untrusted, verdict.ReasonNoPolicy},
	}
	for _, tt := range tests {
		t.Run(tt.repo, func(t *testing.T) {
			t.Parallel()
			p, res := set.Decide(tt.repo)
			if again, _ := set.Decide(tt.repo); again != p { // the second answer comes from the memo
				t.Fatalf("memoized match %v differs from the first %v", again, p)
			}
			name := ""
			if p != nil {
				name = p.Name
			}
			if name != tt.policy {
				t.Fatalf("policy %q, want %q", name, tt.policy)
			}
			if tt.verdict == "" {
				if res != nil {
					t.Fatalf("static result %+v for a policy to verify", res)
				}
				return
			}
			if res == nil || res.Verdict != tt.verdict || res.Reason != tt.reason {
				t.Fatalf("result %+v, want %s/%s", res, tt.verdict, tt.reason)
			}
			if p != nil && res.Fingerprint != p.Fingerprint {
				t.Error("static result without the policy fingerprint")
			}
		})
	}
	var nilSet *Set
	if p := nilSet.Match("x/y"); p != nil {
		t.Error("nil set matched")
	}
}

// The match memo stays bounded however many repositories are asked about,
// and repositories past the bound are still matched correctly.
func TestMatchMemoIsBounded(t *testing.T) {
	t.Parallel()
	set, err := compileYAML(t, "policies:\n- name: hub\n  images: [\"docker.io/**\"]\n  deny: true\n")
	if err != nil {
		t.Fatal(err)
	}
	for i := range maxMemo + 100 {
		if p := set.Match(fmt.Sprintf("docker.io/r/img-%d", i)); p == nil || p.Name != "hub" {
			t.Fatalf("repository %d: %v", i, p)
		}
		if p := set.Match(fmt.Sprintf("quay.io/r/img-%d", i)); p != nil {
			t.Fatalf("quay repository %d matched %s", i, p.Name)
		}
	}
	if n := set.memoSize.Load(); n != maxMemo {
		t.Fatalf("memo holds %d repositories, want the bound %d", n, maxMemo)
	}
}

// Issue 10 hole 5: an identity regexp that only parses once wrapped in
// "^(?:" ... ")$" used to compile to an alternation that matched anyone.
func TestSubjectRegExpAnchoredOnItsParsedForm(t *testing.T) {
	t.Parallel()
	root := filepath.Join(t.TempDir(), "root.json")
	if err := os.WriteFile(root, []byte(`{"mediaType":"application/vnd.dev.sigstore.trustedroot+json;version=0.1"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	const issuer = "https://issuer.example"
	policyFor := func(re string) *config.Config {
		cfg := config.Default()
		cfg.TrustedRoot = root
		cfg.Policies = []config.Policy{{Name: "kl", Images: []string{"**"},
			Keyless: []config.Keyless{{Issuer: issuer, SubjectRegExp: re}}}}
		return cfg
	}
	for _, re := range []string{`ci@example\.com)|(.*`, `a)(b`, `)`, `x)|(?:y`} {
		// Compile guards configs that skipped Validate.
		if set, err := Compile(policyFor(re)); err == nil {
			id := set.Policies[0].Identities[0]
			t.Errorf("%q compiled to %q; mallory matches: %v", re, id.SubjectRegExp,
				id.Matches(issuer, "mallory@attacker.example"))
		}
	}
	tests := []struct {
		re      string
		subject string
		want    bool
	}{
		{`ci@example\.com`, "ci@example.com", true},
		{`ci@example\.com`, "xci@example.com", false},
		{`ci@example\.com`, "ci@example.com.evil", false},
		{`a|b`, "a", true},
		{`a|b`, "ab", false},
		{`a|b`, "xb", false},
		{`.*@example\.com`, "alice@example.com", true},
		{`.*@example\.com`, "alice@example.com\nmallory@evil", false},
		{`(?m)^ci$`, "x\nci", false},
		{`(?m)^ci$`, "ci", true},
		{`(?i)CI@example\.com`, "ci@EXAMPLE.com", true},
	}
	for _, tt := range tests {
		set, err := Compile(policyFor(tt.re))
		if err != nil {
			t.Fatalf("%q: %v", tt.re, err)
		}
		id := set.Policies[0].Identities[0]
		if got := id.Matches(issuer, tt.subject); got != tt.want {
			t.Errorf("%q (anchored %q) on %q = %v, want %v", tt.re, id.SubjectRegExp, tt.subject, got, tt.want)
		}
		// What cosign is handed must mean the same thing.
		if got := regexp.MustCompile(id.SubjectRegExp).MatchString(tt.subject); got != tt.want {
			t.Errorf("cosign's form %q on %q = %v, want %v", id.SubjectRegExp, tt.subject, got, tt.want)
		}
	}
}

// Issue 10 hole 6: globs are normalized like references, so a deny policy
// written with any Docker Hub spelling matches docker.io/library/nginx.
func TestGlobsNormalizedLikeReferences(t *testing.T) {
	t.Parallel()
	k := writeKey(t, t.TempDir(), "k.pub", genPub(t, "p256"))
	for _, glob := range []string{
		"nginx", "library/nginx", "docker.io/nginx", "index.docker.io/library/nginx", "index.docker.io/library/*",
		"index.docker.io/nginx", "docker.io/library/nginx", "*", "docker.io/*", "index.docker.io/**",
	} {
		t.Run(glob, func(t *testing.T) {
			t.Parallel()
			y := fmt.Sprintf("policies:\n- name: deny\n  images: [%q]\n  deny: true\n- name: allow\n  images: [\"**\"]\n  keys: [%s]\n", glob, k)
			set, err := compileYAML(t, y)
			if err != nil {
				t.Fatal(err)
			}
			ref, err := ParseReference("nginx:1.27")
			if err != nil {
				t.Fatal(err)
			}
			p, res := set.Decide(ref.Repo)
			if p == nil || p.Name != "deny" || res == nil || res.Reason != verdict.ReasonDenied {
				t.Fatalf("glob %q: %s decided by %v (%+v), want the deny policy", glob, ref.Repo, p, res)
			}
		})
	}
	tests := []struct {
		glob, want string
	}{
		{"nginx", "docker.io/library/nginx"},
		{"library/nginx", "docker.io/library/nginx"},
		{"acme/*", "docker.io/acme/*"},
		{"docker.io/nginx", "docker.io/library/nginx"},
		{"index.docker.io/library/*", "docker.io/library/*"},
		{"docker.io/**", "docker.io/**"},
		{"**", "**"},
		{"**/nginx", "**/nginx"},
		{"ghcr.io/acme/*", "ghcr.io/acme/*"},
		{"*.gcr.io/**", "*.gcr.io/**"},
		{"localhost/app", "localhost/app"},
		{"127.0.0.1:5000/**", "127.0.0.1:5000/**"},
		{"registry.example.com:443/app", "registry.example.com:443/app"},
	}
	for _, tt := range tests {
		got, err := config.NormalizeGlob(tt.glob)
		if err != nil || got != tt.want {
			t.Errorf("NormalizeGlob(%q) = %q, %v; want %q", tt.glob, got, err, tt.want)
		}
		// A glob without wildcards names the same repository as the reference.
		if !strings.Contains(tt.glob, "*") {
			ref, err := ParseReference(tt.glob)
			if err != nil || ref.Repo != got {
				t.Errorf("ParseReference(%q) = %q, %v; NormalizeGlob gives %q", tt.glob, ref.Repo, err, got)
			}
		}
	}
	for _, glob := range []string{"*/nginx", "foo*/app", "reg.example./app", "-bad.example/app", "reg.example:99999999/app"} {
		if got, err := config.NormalizeGlob(glob); err == nil {
			t.Errorf("NormalizeGlob(%q) = %q, want an error", glob, got)
		}
	}
	if _, err := config.NormalizeGlob("*/nginx"); err == nil || !strings.Contains(err.Error(), "docker.io/*/nginx") {
		t.Errorf("ambiguous glob error %v does not name the normalized form", err)
	}
}

// An Unavailable set (the config's Secret is not mounted yet) decides every
// repository pending: never verified, never untrusted.
func TestUnavailableSetIsPending(t *testing.T) {
	t.Parallel()
	set := Unavailable(fmt.Errorf("key /etc/pinwarden/keys/ci.pub: %w", os.ErrNotExist))
	for _, repo := range []string{"docker.io/library/nginx", "registry.example.com/a"} {
		p, res := set.Decide(repo)
		if p != nil || res == nil || res.Verdict != verdict.Pending || res.Reason != verdict.ReasonQueued ||
			!strings.Contains(res.Detail, "ci.pub") {
			t.Errorf("%s: %v %+v", repo, p, res)
		}
	}
	if set.Err() == nil || len(set.Policies) != 0 {
		t.Error("Unavailable set has no cause or has policies")
	}
	var nilSet *Set
	if nilSet.Err() != nil {
		t.Error("nil set reports an error")
	}
}
