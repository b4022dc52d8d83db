package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// builtFakes caches the fake binaries built by this test process.
var builtFakes = struct {
	sync.Mutex
	dir  string
	bins map[string]string
}{bins: map[string]string{}}

// FakeBinary builds the test binary github.com/pinwarden/pinwarden/test/fakes/<name>
// once per test process and copies it to dir/file, so each test gets its own
// copy (the credential helper keeps its store beside its binary). It returns
// the copy's path.
func FakeBinary(t testing.TB, name, dir, file string) string {
	t.Helper()
	builtFakes.Lock()
	bin, ok := builtFakes.bins[name]
	if !ok {
		if builtFakes.dir == "" {
			d, err := os.MkdirTemp("", "pwfakes")
			if err != nil {
				builtFakes.Unlock()
				t.Fatal(err)
			}
			builtFakes.dir = d
		}
		bin = filepath.Join(builtFakes.dir, name)
		cmd := exec.Command("go", "build", "-o", bin, "github.com/pinwarden/pinwarden/test/fakes/"+name)
		if out, err := cmd.CombinedOutput(); err != nil {
			builtFakes.Unlock()
			t.Fatalf("build fake %s: %v\n%s", name, err, out)
		}
		builtFakes.bins[name] = bin
	}
	builtFakes.Unlock()
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, file)
	if err := os.WriteFile(dst, b, 0o755); err != nil { //nolint:gosec // an executable test binary
		t.Fatal(fmt.Errorf("copy fake %s: %w", name, err))
	}
	return dst
}
