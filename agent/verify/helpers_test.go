package verify

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	ggstatic "github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/policy"
	cbundle "github.com/sigstore/cosign/v2/pkg/cosign/bundle"
	"github.com/sigstore/sigstore-go/pkg/root"
	"github.com/sigstore/sigstore-go/pkg/testing/ca"
	"github.com/sigstore/sigstore-go/pkg/tlog"
	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/sigstore/sigstore/pkg/signature/payload"

	"github.com/pinwarden/pinwarden/test/harness"
)

// testRegistry is ggcr's in-memory registry behind httptest, with a hook to
// inject faults and a count of the requests it served.
type testRegistry struct {
	srv      *httptest.Server
	host     string
	requests atomic.Int64
	conns    atomic.Int64 // connections accepted
	mu       sync.Mutex
	fault    func(w http.ResponseWriter, r *http.Request) bool // guarded by mu; true: handled
}

func newTestRegistry(t testing.TB, referrers bool) *testRegistry {
	t.Helper()
	tr := &testRegistry{}
	reg := registry.New(registry.WithReferrersSupport(referrers), registry.Logger(log.New(io.Discard, "", 0)))
	tr.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tr.requests.Add(1)
		tr.mu.Lock()
		f := tr.fault
		tr.mu.Unlock()
		if f != nil && f(w, r) {
			return
		}
		reg.ServeHTTP(w, r)
	}))
	tr.srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			tr.conns.Add(1)
		}
	}
	tr.srv.Start()
	t.Cleanup(tr.srv.Close)
	tr.host = strings.TrimPrefix(tr.srv.URL, "http://")
	return tr
}

func (tr *testRegistry) setFault(f func(w http.ResponseWriter, r *http.Request) bool) {
	tr.mu.Lock()
	tr.fault = f
	tr.mu.Unlock()
}

// pushImage writes a random image and returns its digest reference.
func (tr *testRegistry) pushImage(t testing.TB, repo string) name.Digest {
	t.Helper()
	img, err := random.Image(64, 1)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.NewTag(tr.host+"/"+repo+":v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return ref.Context().Digest(d.String())
}

// putManifest lets tests PUT arbitrary manifest bytes.
type putManifest struct {
	b  []byte
	mt types.MediaType
}

func (r putManifest) RawManifest() ([]byte, error)        { return r.b, nil }
func (r putManifest) MediaType() (types.MediaType, error) { return r.mt, nil }

// sigLayer is one layer of a hand-built .sig manifest.
type sigLayer struct {
	payload []byte
	ann     map[string]string
	size    int64 // descriptor size override; 0: real size
	skip    bool  // do not upload the blob
}

// putSigManifest uploads layers and writes an OCI manifest under tag.
func putSigManifest(t testing.TB, repo name.Repository, tag string, layers []sigLayer) {
	t.Helper()
	cfg := ggstatic.NewLayer([]byte("{}"), types.OCIConfigJSON)
	if err := remote.WriteLayer(repo, cfg); err != nil {
		t.Fatal(err)
	}
	cd, _ := cfg.Digest()
	m := v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1,
		Config: v1.Descriptor{MediaType: types.OCIConfigJSON, Size: 2, Digest: cd}}
	uploaded := map[string]bool{}
	for _, l := range layers {
		sl := ggstatic.NewLayer(l.payload, "application/vnd.dev.cosign.simplesigning.v1+json")
		d, _ := sl.Digest()
		if !l.skip && !uploaded[d.String()] {
			if err := remote.WriteLayer(repo, sl); err != nil {
				t.Fatal(err)
			}
			uploaded[d.String()] = true
		}
		size := int64(len(l.payload))
		if l.size != 0 {
			size = l.size
		}
		m.Layers = append(m.Layers, v1.Descriptor{MediaType: "application/vnd.dev.cosign.simplesigning.v1+json",
			Size: size, Digest: d, Annotations: l.ann})
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Put(repo.Tag(tag), putManifest{b, types.OCIManifestSchema1}); err != nil {
		t.Fatal(err)
	}
}

func sigTag(d name.Digest) string { return strings.Replace(d.DigestStr(), ":", "-", 1) + ".sig" }

// simplePayload is cosign's simple-signing payload for d.
func simplePayload(t testing.TB, d name.Digest) []byte {
	t.Helper()
	b, err := json.Marshal(payload.Cosign{Image: d})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// testKey is a key pair whose public half is in a PEM file.
type testKey struct {
	sv      signature.SignerVerifier
	pubPath string
	id      string
}

func newTestKey(t testing.TB, kind string) testKey {
	t.Helper()
	var priv crypto.Signer
	var err error
	switch kind {
	case "ecdsa-p256":
		priv, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "ecdsa-p384":
		priv, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "ed25519":
		_, priv, err = ed25519.GenerateKey(rand.Reader)
	case "rsa":
		priv, err = rsa.GenerateKey(rand.Reader, 2048)
	default:
		t.Fatalf("unknown key kind %s", kind)
	}
	if err != nil {
		t.Fatal(err)
	}
	sv, err := signature.LoadSignerVerifier(priv, crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	pem, err := cryptoutils.MarshalPublicKeyToPEM(priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), kind+".pub")
	if err := os.WriteFile(p, pem, 0o600); err != nil {
		t.Fatal(err)
	}
	id, err := policy.KeyID(priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	return testKey{sv: sv, pubPath: p, id: id}
}

// keySig signs payload with k and returns the layer annotations.
func keySig(t testing.TB, k testKey, pl []byte) sigLayer {
	t.Helper()
	sig, err := k.sv.SignMessage(bytes.NewReader(pl))
	if err != nil {
		t.Fatal(err)
	}
	return sigLayer{payload: pl, ann: map[string]string{annSignature: base64.StdEncoding.EncodeToString(sig)}}
}

// virtualSigstore wraps sigstore-go's offline Fulcio/Rekor/TSA and writes
// its trusted root (without CT logs) to a file, as a user would configure it.
type virtualSigstore struct {
	vs       *ca.VirtualSigstore
	rootPath string
}

func newVirtualSigstore(t testing.TB) *virtualSigstore {
	t.Helper()
	vs, err := ca.NewVirtualSigstore()
	if err != nil {
		t.Fatal(err)
	}
	b := harness.TrustedRootJSON(t, vs)
	p := filepath.Join(t.TempDir(), "trusted_root.json")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return &virtualSigstore{vs: vs, rootPath: p}
}

// keylessSig signs payload as identity/issuer with a Fulcio-like cert and a
// Rekor SET, laid out the way cosign attaches them to a .sig layer.
func (v *virtualSigstore) keylessSig(t testing.TB, identity, issuer string, pl []byte, withTlog bool) sigLayer {
	t.Helper()
	// VirtualSigstore's leaf is valid from now for 10 minutes.
	return v.keylessSigAt(t, identity, issuer, pl, withTlog, time.Now().Add(5*time.Minute))
}

// keylessSigAt is keylessSig with the transparency log's integrated time at "at".
func (v *virtualSigstore) keylessSigAt(t testing.TB, identity, issuer string, pl []byte, withTlog bool, at time.Time) sigLayer {
	t.Helper()
	e, err := v.vs.SignAtTime(identity, issuer, pl, at)
	if err != nil {
		t.Fatal(err)
	}
	vc, _ := e.VerificationContent()
	sc, _ := e.SignatureContent()
	leaf := vc.Certificate()
	certPEM, _ := cryptoutils.MarshalCertificateToPEM(leaf)
	caChain := v.vs.FulcioCertificateAuthorities()[0].(*root.FulcioCertificateAuthority)
	chainPEM, _ := cryptoutils.MarshalCertificatesToPEM(append(append([]*x509.Certificate{}, caChain.Intermediates...), caChain.Root))
	ann := map[string]string{
		annSignature: base64.StdEncoding.EncodeToString(sc.Signature()),
		annCert:      string(certPEM),
		annChain:     string(chainPEM),
	}
	if withTlog {
		entries, _ := e.TlogEntries()
		tle := entries[0].TransparencyLogEntry()
		rp := cbundle.RekorPayload{
			Body:           base64.StdEncoding.EncodeToString(tle.GetCanonicalizedBody()),
			IntegratedTime: tle.GetIntegratedTime(),
			LogIndex:       tle.GetLogIndex(),
			LogID:          hex.EncodeToString(tle.GetLogId().GetKeyId()),
		}
		set, err := v.vs.RekorSignPayload(tlog.RekorPayload{Body: rp.Body, IntegratedTime: rp.IntegratedTime, LogIndex: rp.LogIndex, LogID: rp.LogID})
		if err != nil {
			t.Fatal(err)
		}
		rb := cbundle.RekorBundle{SignedEntryTimestamp: set, Payload: rp}
		b, err := json.Marshal(rb)
		if err != nil {
			t.Fatal(err)
		}
		ann[annBundle] = string(b)
	}
	return sigLayer{payload: pl, ann: ann}
}

// policyFor compiles a one-policy config through the real config parser.
func policyFor(t testing.TB, yaml string) *policy.Policy {
	t.Helper()
	cfg, err := config.Parse([]byte(yaml), "")
	if err != nil {
		t.Fatalf("config: %v\n%s", err, yaml)
	}
	set, err := policy.Compile(cfg)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	return set.Policies[0]
}

func newTestVerifier(t testing.TB, tr *testRegistry, mod func(*Options)) *Verifier {
	t.Helper()
	o := Options{
		Registries:     config.Registries{Insecure: []string{tr.host}},
		RequestTimeout: 5 * time.Second,
		RetryBackoff:   5 * time.Millisecond,
		RegistryQPS:    -1, // benchmarks measure verification, not the rate limit
	}
	if mod != nil {
		mod(&o)
	}
	v, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func sha256hex(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}
