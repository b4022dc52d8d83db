package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// SecretVolume lays out Dir the way kubelet mounts a Secret or ConfigMap:
// name -> ..data/name, ..data -> ..<version>. Publish swaps ..data
// atomically (rename of a new symlink), as kubelet does when the object
// changes.
type SecretVolume struct {
	Dir string
	n   int
}

// Publish writes files (name -> content) as a new version and swaps it in.
func (v *SecretVolume) Publish(t testing.TB, files map[string][]byte) {
	t.Helper()
	if err := os.MkdirAll(v.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	v.n++
	ver := filepath.Join(v.Dir, fmt.Sprintf("..2026_12_01_12_00_%02d.%d", v.n, v.n))
	if err := os.Mkdir(ver, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(ver, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(v.Dir, name)
		if _, err := os.Lstat(link); err != nil {
			if err := os.Symlink(filepath.Join("..data", name), link); err != nil {
				t.Fatal(err)
			}
		}
	}
	tmp := filepath.Join(v.Dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(ver), tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(v.Dir, "..data")); err != nil {
		t.Fatal(err)
	}
}
