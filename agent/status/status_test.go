package status

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/pinwarden/pinwarden/agent/verdict"
)

type staticSource []Image

func (s staticSource) Images() []Image { return s }

func sample() []Image {
	at := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	return []Image{
		{Image: "registry.example.com/shop/api:v2.1", Tags: []string{"registry.example.com/shop/api:v2.1"},
			Digest: "sha256:" + strings.Repeat("a", 64), ImageID: "sha256:" + strings.Repeat("c", 64),
			Verdict: verdict.Verified, Signers: []string{"sha256:abc"}, VerifiedAt: &at, Source: verdict.SourceRegistry,
			RunningContainers: 2, Pods: []string{"shop/api-1", "shop/api-2"}},
		{Image: "registry.example.com/a/very/long/repository/path/that/never/ends/worker:v1",
			Digest: "sha256:" + strings.Repeat("b", 64), Verdict: verdict.Unverified, Reason: verdict.ReasonNoSignature,
			Drifted: true, PinnedDigest: "sha256:" + strings.Repeat("d", 64)},
	}
}

func TestRoundTrip(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(Handler(staticSource(sample())))
	defer srv.Close()
	got, err := Fetch(t.Context(), srv.Client(), strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Digest != sample()[0].Digest || got[0].Pods[1] != "shop/api-2" || !got[1].Drifted {
		t.Fatalf("round trip lost data: %+v", got)
	}
	if !got[0].VerifiedAt.Equal(*sample()[0].VerifiedAt) {
		t.Errorf("verifiedAt = %v", got[0].VerifiedAt)
	}
}

func TestEmptyListIsArray(t *testing.T) {
	t.Parallel()
	rec := httptest.NewRecorder()
	Handler(staticSource(nil)).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, Path, nil))
	if strings.TrimSpace(rec.Body.String()) != "[]" {
		t.Fatalf("body = %q, want []", rec.Body.String())
	}
}

func TestFetchUnreachable(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	if _, err := Fetch(t.Context(), http.DefaultClient, addr); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err = %v, want ErrUnreachable", err)
	}
}

func TestTableFits80Columns(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	if err := WriteTable(&buf, sample()); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if n := utf8.RuneCountInString(line); n > 80 {
			t.Errorf("line is %d columns: %q", n, line)
		}
	}
	for _, want := range []string{"verified", "unverified", "aaaaaaaaaaaa", "drifted,no-signature"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

// TestWriteJSONMatchesEncoder: the streamed /v1/images body is byte for
// byte what encoding the whole list at once gives.
func TestWriteJSONMatchesEncoder(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	full := Image{Image: "r.io/a:1<&>", Tags: []string{"r.io/a:1<&>", "r.io/a:2"}, Digest: "sha256:aa", ImageID: "sha256:bb",
		Verdict: verdict.Verified, Reason: "", Drifted: true, PinnedDigest: "sha256:cc", RunningContainers: 2,
		Pods: []string{"ns/p"}, Signers: []string{"k"}, VerifiedAt: &at, Source: verdict.SourceCache, Policy: "p"}
	for _, imgs := range [][]Image{{}, {full}, {full, {Image: "x", Tags: []string{}, Pods: []string{}, Signers: []string{}}, full}} {
		var want, got bytes.Buffer
		enc := json.NewEncoder(&want)
		enc.SetIndent("", "  ")
		if err := enc.Encode(imgs); err != nil {
			t.Fatal(err)
		}
		if err := writeJSON(&got, imgs); err != nil {
			t.Fatal(err)
		}
		if got.String() != want.String() {
			t.Errorf("%d images:\ngot\n%s\nwant\n%s", len(imgs), got.String(), want.String())
		}
	}
}

// The table lists what to act on first: worst verdict, drifted before clean,
// running before idle, then by image.
func TestTableWorstFirst(t *testing.T) {
	in := []Image{
		{Image: "r/ok", Digest: "sha256:01", Verdict: verdict.Verified},
		{Image: "r/ign", Digest: "sha256:02", Verdict: verdict.Ignored},
		{Image: "r/wait", Digest: "sha256:03", Verdict: verdict.Pending, Reason: "queued"},
		{Image: "r/b-idle", Digest: "sha256:04", Verdict: verdict.Unverified, Reason: "no-signature"},
		{Image: "r/a-idle", Digest: "sha256:05", Verdict: verdict.Unverified, Reason: "no-signature"},
		{Image: "r/z-running", Digest: "sha256:06", Verdict: verdict.Unverified, Reason: "no-signature", RunningContainers: 2},
		{Image: "r/denied", Digest: "sha256:07", Verdict: verdict.Untrusted, Reason: "denied"},
		{Image: "r/moved", Digest: "sha256:08", Verdict: verdict.Verified, Drifted: true},
	}
	want := []string{"r/denied", "r/z-running", "r/a-idle", "r/b-idle", "r/wait", "r/moved", "r/ok", "r/ign"}
	var b strings.Builder
	if err := WriteTable(&b, in); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")[1:]
	if len(lines) != len(want) {
		t.Fatalf("%d rows, want %d:\n%s", len(lines), len(want), b.String())
	}
	for i, l := range lines {
		if f := strings.Fields(l); f[1] != want[i] {
			t.Errorf("row %d is %s, want %s\n%s", i, f[1], want[i], b.String())
		}
	}
	if in[0].Image != "r/ok" {
		t.Error("WriteTable reordered its input")
	}
}
