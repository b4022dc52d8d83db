package main

import (
	"context"
	"errors"
	"io"
	"log/slog"

	"github.com/pinwarden/pinwarden/agent"
)

func cmdAgent(ctx context.Context, args []string, stderr io.Writer, logger *slog.Logger) error {
	fs := newFlags("agent", stderr)
	cfgPath := fs.String("config", "", "config file (YAML)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *cfgPath == "" {
		return usageError{errors.New("--config is required")}
	}
	err := agent.Run(ctx, *cfgPath, version, logger)
	var ce agent.ConfigError
	if errors.As(err, &ce) {
		return usageError{err}
	}
	return err
}
