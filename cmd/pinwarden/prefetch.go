package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
)

func cmdPrefetch(ctx context.Context, args []string, stdout, stderr io.Writer, logger *slog.Logger) error {
	fs := newFlags("prefetch", stderr)
	cfgPath := fs.String("config", "", "config file (YAML)")
	output := fs.String("output", "table", "output format: table or json")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := checkOutput(*output); err != nil {
		return err
	}
	if *cfgPath == "" {
		return usageError{errors.New("--config is required")}
	}
	return usageError{errors.New("prefetch is not available in this build yet")}
}
