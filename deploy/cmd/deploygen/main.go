// Command deploygen writes deploy's generated files (the PrometheusRule and
// the Grafana dashboard). Run it from the deploy directory: go generate ./...
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/pinwarden/pinwarden/deploy/internal/gen"
)

func main() {
	dir := "."
	if len(os.Args) > 1 {
		dir = os.Args[1]
	}
	if err := run(dir); err != nil {
		fmt.Fprintln(os.Stderr, "deploygen:", err)
		os.Exit(1)
	}
}

func run(dir string) error {
	files, err := gen.Files(dir)
	if err != nil {
		return err
	}
	for path, b := range files {
		if err := os.WriteFile(filepath.Join(dir, path), b, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
	}
	return nil
}
