package agent

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/pinwarden/pinwarden/agent/metrics"
)

type fakeRuntime struct{ ready, up atomic.Bool }

func (f *fakeRuntime) Ready() bool     { return f.ready.Load() }
func (f *fakeRuntime) RuntimeUp() bool { return f.up.Load() }

// TestProbesRuntimeOutage: /readyz turns 503 once the runtime has been down
// longer than the grace period and 200 again when it is back; /healthz stays
// 200 throughout, so an outage never restarts the agent.
func TestProbesRuntimeOutage(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rt := &fakeRuntime{}
		h := probes(metrics.New("test", 10), rt)
		get := func(path string) (int, string) {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
			return rec.Code, rec.Body.String()
		}
		expect := func(step, path string, want int, wantBody string) {
			t.Helper()
			code, body := get(path)
			if code != want || !strings.Contains(body, wantBody) {
				t.Fatalf("%s: %s = %d %q, want %d containing %q", step, path, code, body, want, wantBody)
			}
		}

		expect("before the first list", "/readyz", 503, "first full list")
		expect("before the first list", "/healthz", 200, "ok")
		rt.ready.Store(true)
		rt.up.Store(true)
		expect("runtime up", "/readyz", 200, "ok")

		rt.up.Store(false)
		expect("runtime just went down", "/readyz", 200, "ok")
		time.Sleep(runtimeDownGrace / 2)
		expect("down for half the grace", "/readyz", 200, "ok")
		time.Sleep(runtimeDownGrace/2 + time.Second)
		expect("down longer than the grace", "/readyz", 503, "container runtime unreachable for 1m1s")
		expect("down longer than the grace", "/healthz", 200, "ok")

		rt.up.Store(true)
		expect("runtime back", "/readyz", 200, "ok")
		rt.up.Store(false)
		expect("a new outage starts its own grace", "/readyz", 200, "ok")
	})
}
