package harness

import "testing"

// SkipShort skips the test under `go test -short` (`make test-unit`): it
// needs what starts here, an external process such as containerd, the
// distribution registry or the agent binary. In-process registries
// (StartRegistry) are cheap and run in short mode too.
func SkipShort(t testing.TB, what string) {
	t.Helper()
	if testing.Short() {
		t.Skipf("-short: skipping a test that needs %s", what)
	}
}
