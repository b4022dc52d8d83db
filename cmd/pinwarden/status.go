package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/pinwarden/pinwarden/agent/status"
)

func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("status", stderr)
	addr := fs.String("addr", "127.0.0.1:9843", "address of the agent's status API")
	output := fs.String("output", "table", "output format: table or json")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := checkOutput(*output); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	imgs, err := status.Fetch(ctx, &http.Client{}, *addr)
	if err != nil {
		return usageError{fmt.Errorf("cannot reach the agent at %s: %w", *addr, err)}
	}
	if *output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(imgs)
	}
	return status.WriteTable(stdout, imgs)
}
