package verify

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/secure-systems-lab/go-securesystemslib/dsse"
	cbundle "github.com/sigstore/cosign/v2/pkg/cosign/bundle"
	protobundle "github.com/sigstore/protobuf-specs/gen/pb-go/bundle/v1"
	protocommon "github.com/sigstore/protobuf-specs/gen/pb-go/common/v1"
	protodsse "github.com/sigstore/protobuf-specs/gen/pb-go/dsse"
	protorekor "github.com/sigstore/protobuf-specs/gen/pb-go/rekor/v1"
	"github.com/sigstore/rekor/pkg/pki"
	rekortypes "github.com/sigstore/rekor/pkg/types"
	sgbundle "github.com/sigstore/sigstore-go/pkg/bundle"
	"github.com/sigstore/sigstore-go/pkg/root"
	"github.com/sigstore/sigstore-go/pkg/testing/ca"
	"github.com/sigstore/sigstore-go/pkg/tlog"
	"github.com/sigstore/sigstore/pkg/cryptoutils"
	"google.golang.org/protobuf/encoding/protojson"
)

// Tests for the holes of issue 10 that live in agent/verify. The heap tests
// are not parallel: they read process-wide heap figures.

// peakHeap runs f and returns the highest heap in use (live objects and
// garbage not yet collected) seen above the level before f, sampled every
// 100µs by another goroutine.
func peakHeap(t testing.TB, f func()) uint64 {
	t.Helper()
	runtime.GC()
	read := func() uint64 {
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		metrics.Read(s)
		return s[0].Value.Uint64()
	}
	base := read()
	var peak atomic.Uint64
	observe := func() {
		if h := read(); h > peak.Load() {
			peak.Store(h)
		}
	}
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		tk := time.NewTicker(100 * time.Microsecond)
		defer tk.Stop()
		for {
			select {
			case <-done:
				return
			case <-tk.C:
				observe()
			}
		}
	}()
	f()
	observe()
	close(done)
	<-stopped
	if p := peak.Load(); p > base {
		return p - base
	}
	return 0
}

// Hole 1: a .sig manifest with 100 layers of 4 MiB each (every one within
// the per-layer limits) is checked one layer at a time within a byte budget,
// and ends as a definitive (cacheable) unverified/too-large.
func TestSignatureLayersStreamedWithinBudget(t *testing.T) {
	reg := newTestRegistry(t, true)
	d := reg.pushImage(t, "hostile/sig")
	k := newTestKey(t, "ecdsa-p256")
	big := bytes.Repeat([]byte("x"), 4<<20)
	l := sigLayer{payload: big, ann: map[string]string{annSignature: "AAAA"}}
	ls := make([]sigLayer, 100)
	for i := range ls {
		ls[i] = l
	}
	putSigManifest(t, d.Context(), sigTag(d), ls)
	v := newTestVerifier(t, reg, nil)
	p := policyFor(t, keysYAML("", 0, false, k))
	var res verdict.Result
	peak := peakHeap(t, func() { res = v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr()) })
	t.Logf("peak heap of one verification of 100 x 4 MiB signature layers: %.1f MiB (%s/%s)", float64(peak)/(1<<20), res.Verdict, res.Reason)
	if res.Verdict != verdict.Unverified || res.Reason != verdict.ReasonTooLarge || !res.Definitive() {
		t.Fatalf("got %s/%s (%s), want a definitive unverified/too-large", res.Verdict, res.Reason, res.Detail)
	}
	if peak > 48<<20 {
		t.Fatalf("peak heap %d MiB: signature layers are held together", peak>>20)
	}
}

// paddedStatement is a cosign signing statement for d padded to about n bytes.
func paddedStatement(t testing.TB, d name.Digest, n int) []byte {
	t.Helper()
	st := map[string]any{
		"_type":         "https://in-toto.io/Statement/v1",
		"subject":       []any{map[string]any{"name": d.Context().Name(), "digest": map[string]string{"sha256": d.DigestStr()[len("sha256:"):]}}},
		"predicateType": "https://sigstore.dev/cosign/sign/v1",
		"predicate":     map[string]any{"pad": strings.Repeat("p", n)},
	}
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Hole 2: 60 bundle referrers of about 2.9 MiB each (each within the limits)
// are fetched and checked one at a time within the byte budget.
func TestBundleReferrersStreamedWithinBudget(t *testing.T) {
	reg := newTestRegistry(t, true)
	d := reg.pushImage(t, "hostile/bundles")
	k, other := newTestKey(t, "ecdsa-p256"), newTestKey(t, "ecdsa-p256")
	b := keyBundle(t, other, paddedStatement(t, d, 2<<20+150<<10))
	if len(b) < 2800<<10 || len(b) > 3<<20 {
		t.Fatalf("bundle of %d bytes", len(b))
	}
	attachBundle(t, d, b)
	idx, err := remote.Referrers(d, remote.WithContext(t.Context()))
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("referrers: %v %v", im, err)
	}
	desc := im.Manifests[0]
	desc.ArtifactType = BundleMediaType
	hostile := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex}
	for range 60 {
		hostile.Manifests = append(hostile.Manifests, desc)
	}
	body, err := json.Marshal(hostile)
	if err != nil {
		t.Fatal(err)
	}
	reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/referrers/") {
			w.Header().Set("Content-Type", string(types.OCIImageIndex))
			_, _ = w.Write(body)
			return true
		}
		return false
	})
	v := newTestVerifier(t, reg, nil)
	p := policyFor(t, keysYAML("", 0, false, k))
	var res verdict.Result
	peak := peakHeap(t, func() { res = v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr()) })
	t.Logf("peak heap of one verification of 60 x %.1f MiB bundles: %.1f MiB (%s/%s)", float64(len(b))/(1<<20), float64(peak)/(1<<20), res.Verdict, res.Reason)
	if res.Verdict != verdict.Unverified || res.Reason != verdict.ReasonTooLarge || !res.Definitive() {
		t.Fatalf("got %s/%s (%s), want a definitive unverified/too-large", res.Verdict, res.Reason, res.Detail)
	}
	if peak > 48<<20 {
		t.Fatalf("peak heap %d MiB: bundles are held together", peak>>20)
	}
}

// Hole 3: a .sig manifest that redirects to itself is given up after 10
// redirects, not at the end of VerifyTimeout.
func TestRedirectLoopCapped(t *testing.T) {
	reg := newTestRegistry(t, true)
	d := reg.pushImage(t, "hostile/redirect")
	k := newTestKey(t, "ecdsa-p256")
	var hops atomic.Int64
	reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, ".sig") {
			return false
		}
		n := hops.Add(1)
		http.Redirect(w, r, fmt.Sprintf("%s?hop=%d", r.URL.Path, n), http.StatusTemporaryRedirect)
		return true
	})
	v := newTestVerifier(t, reg, func(o *Options) { o.VerifyTimeout = 5 * time.Second })
	p := policyFor(t, keysYAML("", 0, false, k))
	var res verdict.Result
	start := time.Now()
	peak := peakHeap(t, func() { res = v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr()) })
	took := time.Since(start)
	t.Logf("self-redirecting .sig: %d requests in %v, peak heap %.1f MiB (%s/%s)", hops.Load(), took, float64(peak)/(1<<20), res.Verdict, res.Reason)
	if res.Verdict != verdict.Pending || res.Reason != verdict.ReasonRegistryError {
		t.Fatalf("got %s/%s (%s), want pending/registry-error", res.Verdict, res.Reason, res.Detail)
	}
	if n := hops.Load(); n > maxRedirects+1 {
		t.Fatalf("%d requests to a self-redirecting .sig, want at most %d", n, maxRedirects+1)
	}
}

// Hole 3: RequestTimeout bounds a request with all its redirect hops, not
// each hop: a chain of slow hops, each well within the timeout, stops at it.
func TestRedirectChainSharesOneDeadline(t *testing.T) {
	t.Parallel()
	reg := newTestRegistry(t, true)
	d := reg.pushImage(t, "hostile/slowchain")
	k := newTestKey(t, "ecdsa-p256")
	var hops atomic.Int64
	reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, ".sig") {
			return false
		}
		n := hops.Add(1)
		// A slow hop: answer after 200 ms unless the client gives up first.
		tm := time.NewTimer(200 * time.Millisecond)
		defer tm.Stop()
		select {
		case <-r.Context().Done():
			return true
		case <-tm.C:
		}
		http.Redirect(w, r, fmt.Sprintf("%s?hop=%d", r.URL.Path, n), http.StatusTemporaryRedirect)
		return true
	})
	v := newTestVerifier(t, reg, func(o *Options) {
		o.RequestTimeout = 500 * time.Millisecond
		o.VerifyTimeout = 6 * time.Second
		o.Retries = -1
	})
	res := v.Verify(t.Context(), policyFor(t, keysYAML("", 0, false, k)), d.Context().Name(), d.DigestStr())
	t.Logf("slow redirect chain: %d hops (%s/%s)", hops.Load(), res.Verdict, res.Reason)
	if res.Verdict != verdict.Pending {
		t.Fatalf("got %s/%s (%s), want pending", res.Verdict, res.Reason, res.Detail)
	}
	// 500 ms at 200 ms per hop: at most 3 hops start.
	if n := hops.Load(); n > 4 {
		t.Fatalf("%d hops of 200 ms within a 500 ms request timeout: the timeout applies per hop", n)
	}
}

// Hole 4: the per-host rate limiters stay bounded however many hosts are
// seen (a redirect storm makes one per target host).
func TestHostLimitersBounded(t *testing.T) {
	h := &hostLimits{qps: 50, burst: 100}
	const hosts = 180_000
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	ctx := context.Background()
	for i := range hosts {
		if err := h.wait(ctx, fmt.Sprintf("storage-%d.example:443", i)); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	var retained uint64
	if after.HeapAlloc > before.HeapAlloc {
		retained = after.HeapAlloc - before.HeapAlloc
	}
	runtime.KeepAlive(h)
	t.Logf("heap retained by the limiters of %d hosts: %.2f MiB", hosts, float64(retained)/(1<<20))
	if retained > 4<<20 {
		t.Fatalf("%d MiB retained for %d hosts: the limiter map is not bounded", retained>>20, hosts)
	}
}

// Hole 8: threshold 2 of {".*@example\.com", "bob@example.com"} holds
// whatever the order of the signatures, in both paths.
func TestThresholdMatchingIsOrderIndependent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const alice, bob = "alice@example.com", "bob@example.com"
	yaml := fmt.Sprintf("trustedRoot: %s\npolicies:\n- name: test\n  images: [\"**\"]\n  threshold: 2\n  keyless:\n  - issuer: %s\n    subjectRegExp: '.*@example\\.com'\n  - issuer: %s\n    subject: %s\n", e.vs.rootPath, issuer, issuer, bob)
	p := policyFor(t, yaml)
	v := newTestVerifier(t, e.reg, nil)
	for _, order := range [][]string{{alice, bob}, {bob, alice}} {
		t.Run("legacy "+strings.Join(order, ","), func(t *testing.T) {
			d := e.reg.pushImage(t, "match/legacy")
			var ls []sigLayer
			for _, who := range order {
				ls = append(ls, e.vs.keylessSig(t, who, issuer, simplePayload(t, d), true))
			}
			putSigManifest(t, d.Context(), sigTag(d), ls)
			res := v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr())
			if res.Verdict != verdict.Verified {
				t.Fatalf("got %s/%s (%s)", res.Verdict, res.Reason, res.Detail)
			}
		})
		t.Run("bundle "+strings.Join(order, ","), func(t *testing.T) {
			d := e.reg.pushImage(t, "match/bundle")
			tl := newTally(p)
			for _, who := range order {
				raw := e.vs.keylessBundle(t, who, issuer, cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1"))
				var b sgbundle.Bundle
				if err := b.UnmarshalJSON(raw); err != nil {
					t.Fatal(err)
				}
				v.checkBundle(t.Context(), p, sigBundle{b: &b}, d, tl)
			}
			if !tl.met() {
				t.Fatalf("threshold not met: %v", tl.failure())
			}
		})
	}
	t.Run("one signer cannot fill both", func(t *testing.T) {
		d := e.reg.pushImage(t, "match/one")
		putSigManifest(t, d.Context(), sigTag(d), []sigLayer{
			e.vs.keylessSig(t, bob, issuer, simplePayload(t, d), true), e.vs.keylessSig(t, bob, issuer, simplePayload(t, d), true)})
		res := v.Verify(t.Context(), p, d.Context().Name(), d.DigestStr())
		if res.Verdict != verdict.Unverified || res.Reason != verdict.ReasonThresholdNotMet {
			t.Fatalf("got %s/%s (%s), want unverified/threshold-not-met", res.Verdict, res.Reason, res.Detail)
		}
	})
}

// Hole 9: a .sig manifest redirected to a pre-signed URL that then fails
// (here: nothing listens there) leaves no query string nor user info in
// Result.Detail or the log.
func TestPresignedURLRedacted(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()
	tests := []struct{ name, location string }{
		{"query", "http://" + closed + "/presigned/object?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefsecret"},
		{"user info", "http://presigneduser:deadbeefsecret@" + closed + "/presigned/object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			reg := newTestRegistry(t, true)
			d := reg.pushImage(t, "hostile/presigned")
			k := newTestKey(t, "ecdsa-p256")
			reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
				if strings.HasSuffix(r.URL.Path, ".sig") {
					http.Redirect(w, r, tt.location, http.StatusTemporaryRedirect)
					return true
				}
				return false
			})
			var logs bytes.Buffer
			v := newTestVerifier(t, reg, func(o *Options) {
				o.Registries.Insecure = append(o.Registries.Insecure, closed)
				o.Retries = -1
				o.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			})
			res := v.Verify(t.Context(), policyFor(t, keysYAML("", 0, false, k)), d.Context().Name(), d.DigestStr())
			if res.Verdict != verdict.Pending || res.Detail == "" {
				t.Fatalf("got %s/%s (%s), want pending with a detail", res.Verdict, res.Reason, res.Detail)
			}
			for what, s := range map[string]string{"detail": res.Detail, "log": logs.String()} {
				for _, secret := range []string{"deadbeefsecret", "AKIAEXAMPLE", "presigneduser"} {
					if strings.Contains(s, secret) {
						t.Errorf("%s leaks %q: %s", what, secret, s)
					}
				}
			}
			t.Logf("detail: %s", res.Detail)
		})
	}
}

// sanCA is a Fulcio-like CA of the test's own, for certificates with
// several SANs (sigstore-go's virtual Fulcio issues one). Its trusted root
// shares the virtual Rekor of vs, which signs the log entries.
type sanCA struct {
	vs          *virtualSigstore
	root, inter *x509.Certificate
	interKey    *ecdsa.PrivateKey
	rootPath    string
}

func newSANCA(t testing.TB, vs *virtualSigstore) *sanCA {
	t.Helper()
	rootCert, rootKey, err := ca.GenerateRootCa()
	if err != nil {
		t.Fatal(err)
	}
	inter, interKey, err := ca.GenerateFulcioIntermediate(rootCert, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	rekor := map[string]*root.TransparencyLog{}
	for id, l := range vs.vs.RekorLogs() {
		c := *l
		if c.ID, err = hex.DecodeString(id); err != nil {
			t.Fatal(err)
		}
		rekor[id] = &c
	}
	fca := &root.FulcioCertificateAuthority{Root: rootCert, Intermediates: []*x509.Certificate{inter}, URI: "https://fulcio.test"}
	tr, err := root.NewTrustedRoot(root.TrustedRootMediaType01, []root.CertificateAuthority{fca}, nil, vs.vs.TimestampingAuthorities(), rekor)
	if err != nil {
		t.Fatal(err)
	}
	b, err := tr.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "san_root.json")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return &sanCA{vs: vs, root: rootCert, inter: inter, interKey: interKey, rootPath: p}
}

// leaf issues a code-signing certificate with the given SANs for oidcIssuer,
// valid from now for 10 minutes.
func (c *sanCA) leaf(t testing.TB, uris, emails []string, oidcIssuer string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), EmailAddresses: emails,
		NotBefore: time.Now(), NotAfter: time.Now().Add(10 * time.Minute),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning},
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 57264, 1, 1}, Value: []byte(oidcIssuer)}},
	}
	for _, u := range uris {
		pu, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.inter, &key.PublicKey, c.interKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// logEntry signs a Rekor entry body at the integrated time "at" and returns
// the log ID (hex) and the SET.
func (c *sanCA) logEntry(t testing.TB, body []byte, at int64) (string, []byte) {
	t.Helper()
	logID, err := c.vs.vs.RekorLogID()
	if err != nil {
		t.Fatal(err)
	}
	set, err := c.vs.vs.RekorSignPayload(tlog.RekorPayload{Body: base64.StdEncoding.EncodeToString(body), IntegratedTime: at, LogIndex: 0, LogID: logID})
	if err != nil {
		t.Fatal(err)
	}
	return logID, set
}

// legacySig is a keyless .sig layer by leaf over pl, with a hashedrekord
// entry and its SET, as cosign attaches them.
func (c *sanCA) legacySig(t testing.TB, leaf *x509.Certificate, key *ecdsa.PrivateKey, pl []byte) sigLayer {
	t.Helper()
	h := sha256.Sum256(pl)
	sig, err := ecdsa.SignASN1(rand.Reader, key, h[:])
	if err != nil {
		t.Fatal(err)
	}
	certPEM, _ := cryptoutils.MarshalCertificateToPEM(leaf)
	chainPEM, _ := cryptoutils.MarshalCertificatesToPEM([]*x509.Certificate{c.inter, c.root})
	b64 := base64.StdEncoding.EncodeToString
	body := fmt.Sprintf(`{"apiVersion":"0.0.1","kind":"hashedrekord","spec":{"data":{"hash":{"algorithm":"sha256","value":"%x"}},"signature":{"content":"%s","publicKey":{"content":"%s"}}}}`,
		h, b64(sig), b64(certPEM))
	at := time.Now().Add(5 * time.Minute).Unix()
	logID, set := c.logEntry(t, []byte(body), at)
	rb, err := json.Marshal(cbundle.RekorBundle{SignedEntryTimestamp: set,
		Payload: cbundle.RekorPayload{Body: b64([]byte(body)), IntegratedTime: at, LogIndex: 0, LogID: logID}})
	if err != nil {
		t.Fatal(err)
	}
	return sigLayer{payload: pl, ann: map[string]string{annSignature: b64(sig), annCert: string(certPEM), annChain: string(chainPEM), annBundle: string(rb)}}
}

// bundle is a v0.3 bundle by leaf: a DSSE envelope over stmt, with a dsse
// Rekor entry carrying an inclusion promise and proof.
func (c *sanCA) bundle(t testing.TB, leaf *x509.Certificate, key *ecdsa.PrivateKey, stmt []byte) *sgbundle.Bundle {
	t.Helper()
	const pt = "application/vnd.in-toto+json"
	h := sha256.Sum256(dsse.PAE(pt, stmt))
	sig, err := ecdsa.SignASN1(rand.Reader, key, h[:])
	if err != nil {
		t.Fatal(err)
	}
	env := dsse.Envelope{PayloadType: pt, Payload: base64.StdEncoding.EncodeToString(stmt),
		Signatures: []dsse.Signature{{Sig: base64.StdEncoding.EncodeToString(sig)}}}
	envJSON, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, _ := cryptoutils.MarshalCertificateToPEM(leaf)
	pe, err := rekortypes.NewProposedEntry(t.Context(), "dsse", "0.0.1", rekortypes.ArtifactProperties{
		ArtifactBytes: envJSON, PublicKeyBytes: [][]byte{certPEM}, PKIFormat: string(pki.X509)})
	if err != nil {
		t.Fatal(err)
	}
	ei, err := rekortypes.CreateVersionedEntry(pe)
	if err != nil {
		t.Fatal(err)
	}
	body, err := rekortypes.CanonicalizeEntry(t.Context(), ei)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Now().Add(5 * time.Minute).Unix()
	logID, set := c.logEntry(t, body, at)
	proof, err := c.vs.vs.GetInclusionProof(body)
	if err != nil {
		t.Fatal(err)
	}
	rawID, _ := hex.DecodeString(logID)
	//nolint:staticcheck // tlog.NewEntry is what sigstore-go's own test CA uses to build entries.
	e, err := tlog.NewEntry(body, at, 0, rawID, set, proof)
	if err != nil {
		t.Fatal(err)
	}
	tle := e.TransparencyLogEntry()
	tle.KindVersion = &protorekor.KindVersion{Kind: "dsse", Version: "0.0.1"}
	tle.InclusionPromise = &protorekor.InclusionPromise{SignedEntryTimestamp: set}
	pb := &protobundle.Bundle{
		MediaType: BundleMediaType,
		VerificationMaterial: &protobundle.VerificationMaterial{
			Content:     &protobundle.VerificationMaterial_Certificate{Certificate: &protocommon.X509Certificate{RawBytes: leaf.Raw}},
			TlogEntries: []*protorekor.TransparencyLogEntry{tle},
		},
		Content: &protobundle.Bundle_DsseEnvelope{DsseEnvelope: &protodsse.Envelope{
			Payload: stmt, PayloadType: pt, Signatures: []*protodsse.Signature{{Sig: sig}},
		}},
	}
	raw, err := protojson.Marshal(pb)
	if err != nil {
		t.Fatal(err)
	}
	var b sgbundle.Bundle
	if err := b.UnmarshalJSON(raw); err != nil {
		t.Fatal(err)
	}
	return &b
}

// Hole 10: a certificate with SANs {URI https://evil.example/wf, e-mail
// ci@example.com} satisfies a policy for ci@example.com in both paths, and
// the signer reported is the SAN that matched. A policy for another subject
// still refuses it.
func TestSignerIsTheMatchingSAN(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c := newSANCA(t, e.vs)
	leaf, key := c.leaf(t, []string{"https://evil.example/wf"}, []string{ident}, issuer)
	want := issuer + " " + ident
	for _, tt := range []struct {
		name, subject, subjectRE string
		verified                 bool
	}{
		{"subject", ident, "", true},
		{"regexp", "", `ci@example\.com`, true},
		{"another subject", "bob@example.com", "", false},
	} {
		p := policyFor(t, keylessYAML(c.rootPath, tt.subject, tt.subjectRE))
		t.Run("legacy "+tt.name, func(t *testing.T) {
			d := e.reg.pushImage(t, "san/legacy")
			putSigManifest(t, d.Context(), sigTag(d), []sigLayer{c.legacySig(t, leaf, key, simplePayload(t, d))})
			res := newTestVerifier(t, e.reg, nil).Verify(t.Context(), p, d.Context().Name(), d.DigestStr())
			if !tt.verified {
				if res.Verdict != verdict.Unverified || res.Reason != verdict.ReasonIdentityMismatch {
					t.Fatalf("got %s/%s (%s), want unverified/identity-mismatch", res.Verdict, res.Reason, res.Detail)
				}
				return
			}
			if res.Verdict != verdict.Verified || len(res.Signers) != 1 || res.Signers[0] != want {
				t.Fatalf("got %s/%s %q (%s), want verified by %q", res.Verdict, res.Reason, res.Signers, res.Detail, want)
			}
		})
		t.Run("bundle "+tt.name, func(t *testing.T) {
			d := e.reg.pushImage(t, "san/bundle")
			tl := newTally(p)
			v := newTestVerifier(t, e.reg, nil)
			v.checkBundle(t.Context(), p, sigBundle{b: c.bundle(t, leaf, key, cosignStatement(t, d, "https://sigstore.dev/cosign/sign/v1"))}, d, tl)
			if tl.met() != tt.verified {
				t.Fatalf("met = %v, want %v (%v)", tl.met(), tt.verified, tl.failure())
			}
			if tt.verified && (len(tl.signers()) != 1 || tl.signers()[0] != want) {
				t.Fatalf("signers %q, want %q", tl.signers(), want)
			}
		})
	}
}

// Hole 4: requests to the hosts a registry redirects to are charged to that
// registry's rate limiter: a redirect storm adds no limiter.
func TestRedirectTargetsShareTheRegistryLimiter(t *testing.T) {
	t.Parallel()
	reg, storage := newTestRegistry(t, true), newTestRegistry(t, true)
	d := reg.pushImage(t, "hostile/storm")
	k := newTestKey(t, "ecdsa-p256")
	reg.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasSuffix(r.URL.Path, ".sig") {
			http.Redirect(w, r, "http://"+storage.host+r.URL.Path, http.StatusTemporaryRedirect)
			return true
		}
		return false
	})
	v := newTestVerifier(t, reg, func(o *Options) {
		o.Registries.Insecure = append(o.Registries.Insecure, storage.host)
		o.RegistryQPS, o.RegistryBurst = 1000, 100
	})
	res := v.Verify(t.Context(), policyFor(t, keysYAML("", 0, false, k)), d.Context().Name(), d.DigestStr())
	if storage.requests.Load() == 0 {
		t.Fatalf("the redirect was not followed (%s/%s: %s)", res.Verdict, res.Reason, res.Detail)
	}
	if n := v.rt.(*guardTransport).limits.len(); n != 1 {
		t.Fatalf("%d rate limiters after one verification redirected to another host, want 1 (the registry's)", n)
	}
}

func TestRedactURLs(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{`Get "https://bucket.s3.example/blob?X-Amz-Signature=abc&X-Amz-Credential=AKIA": EOF`, `Get "https://bucket.s3.example/blob?REDACTED": EOF`},
		{`Get "https://user:pass@host.example:8443/v2/x": refused`, `Get "https://host.example:8443/v2/x": refused`},
		{`Get "https://user:***@host.example/p?q=1#frag": x`, `Get "https://host.example/p?REDACTED": x`},
		{`GET https://host.example/v2/r/manifests/sha256-ab.sig: unexpected status code 403`, `GET https://host.example/v2/r/manifests/sha256-ab.sig: unexpected status code 403`},
		{`two: http://a.example/?t=1 and https://u@b.example?x=2`, `two: http://a.example/?REDACTED and https://b.example?REDACTED`},
		{`no url here: token=abc`, `no url here: token=abc`},
	}
	for _, tt := range tests {
		if got := redactURLs(tt.in); got != tt.want {
			t.Errorf("redactURLs(%q)\n got %q\nwant %q", tt.in, got, tt.want)
		}
	}
}
