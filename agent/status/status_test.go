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

	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

type staticSource struct{ st *nodestate.State }

func (s staticSource) State() *nodestate.State { return s.st }

func sampleState() *nodestate.State {
	at := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	worker := "registry.example.com/a/very/long/repository/path/that/never/ends/worker:v1"
	return &nodestate.State{Images: []nodestate.Image{
		{Name: "registry.example.com/shop/api:v2.1", Tags: []string{"registry.example.com/shop/api:v2.1"},
			Digest: "sha256:" + strings.Repeat("a", 64), ImageID: "sha256:" + strings.Repeat("c", 64),
			Result:  verdict.Result{Verdict: verdict.Verified, Signers: []string{"sha256:abc"}, VerifiedAt: at, Source: verdict.SourceRegistry},
			Running: 2, Pods: []string{"shop/api-1", "shop/api-2"}},
		{Name: worker, Tags: []string{worker}, Digest: "sha256:" + strings.Repeat("b", 64),
			Result: verdict.Result{Verdict: verdict.Unverified, Reason: verdict.ReasonNoSignature},
			Pins:   []nodestate.TagPin{{Tag: worker, Digest: "sha256:" + strings.Repeat("d", 64)}}},
	}}
}

func sample() []Image { return FromState(sampleState()) }

func TestRoundTrip(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(Handler(staticSource{sampleState()}))
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
	Handler(staticSource{nil}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, Path, nil))
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
	full := nodestate.Image{Name: "r.io/a:1<&>", Tags: []string{"r.io/a:1<&>", "r.io/a:2"}, Digest: "sha256:aa", ImageID: "sha256:bb",
		Result:  verdict.Result{Verdict: verdict.Verified, Signers: []string{"k"}, VerifiedAt: at, Source: verdict.SourceCache, Policy: "p"},
		Running: 2, Pods: []string{"ns/p"}, Pins: []nodestate.TagPin{{Tag: "r.io/a:2", Digest: "sha256:cc"}}}
	for _, imgs := range [][]nodestate.Image{{}, {full}, {full, {Name: "x"}, full}} {
		var want, got bytes.Buffer
		enc := json.NewEncoder(&want)
		enc.SetIndent("", "  ")
		if err := enc.Encode(FromState(&nodestate.State{Images: imgs})); err != nil {
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

// TestStatusJSONView: the /v1/images object of a node-state image, byte for
// byte: every field of the CONTRACT in its order, empty lists as [], a
// never-judged image's verifiedAt as null, drift from its pinned tags.
func TestStatusJSONView(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		name string
		img  nodestate.Image
		want string
	}{
		{"verified, running, signed",
			nodestate.Image{Name: "r.io/a:v1", Tags: []string{"r.io/a:v1"}, Digest: "sha256:1", ImageID: "sha256:11",
				Result:  verdict.Result{Verdict: verdict.Verified, Policy: "p", Signers: []string{"k"}, VerifiedAt: at, Source: verdict.SourceCache, Detail: "not shown", Fingerprint: "not shown"},
				Running: 4, Pods: []string{"a/p1", "b/p2"}},
			`{"image":"r.io/a:v1","tags":["r.io/a:v1"],"digest":"sha256:1","imageID":"sha256:11","verdict":"verified","reason":"","drifted":false,"pinnedDigest":"","runningContainers":4,"pods":["a/p1","b/p2"],"signers":["k"],"verifiedAt":"2026-01-02T03:04:05Z","source":"cache","policy":"p"}`},
		{"queued, no tags",
			nodestate.Image{Name: "r.io/b", Digest: "sha256:2", Result: verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonQueued}},
			`{"image":"r.io/b","tags":[],"digest":"sha256:2","imageID":"","verdict":"pending","reason":"queued","drifted":false,"pinnedDigest":"","runningContainers":0,"pods":[],"signers":[],"verifiedAt":null,"source":""}`},
		{"drifted pinned tag",
			nodestate.Image{Name: "r.io/d:v1", Tags: []string{"r.io/d:v1", "r.io/d:v2"}, Digest: "sha256:4",
				Result: verdict.Result{Verdict: verdict.Verified, VerifiedAt: at},
				Pins:   []nodestate.TagPin{{Tag: "r.io/d:v2", Digest: "sha256:44"}}},
			`{"image":"r.io/d:v1","tags":["r.io/d:v1","r.io/d:v2"],"digest":"sha256:4","imageID":"","verdict":"verified","reason":"","drifted":true,"pinnedDigest":"sha256:44","runningContainers":0,"pods":[],"signers":[],"verifiedAt":"2026-01-02T03:04:05Z","source":""}`},
		{"pinned and matching",
			nodestate.Image{Name: "r.io/e:v1", Tags: []string{"r.io/e:v1"}, Digest: "sha256:5",
				Result: verdict.Result{Verdict: verdict.Ignored}, Pins: []nodestate.TagPin{{Tag: "r.io/e:v1", Digest: "sha256:5"}}},
			`{"image":"r.io/e:v1","tags":["r.io/e:v1"],"digest":"sha256:5","imageID":"","verdict":"ignored","reason":"","drifted":false,"pinnedDigest":"sha256:5","runningContainers":0,"pods":[],"signers":[],"verifiedAt":null,"source":""}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := json.Marshal(FromNode(&tt.img))
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Errorf("got\n%s\nwant\n%s", got, tt.want)
			}
		})
	}
}
