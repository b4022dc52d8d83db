// Command pinwarden is the node agent and its CLI. main only parses flags and
// wires the packages under agent/ together; see README.md for the commands.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"syscall"
)

// Set by the linker: -X main.version=... -X main.commit=...
var (
	version = "dev"
	commit  = "unknown"
)

// Exit codes of the CONTRACT.
const (
	exitOK       = 0
	exitNotOK    = 1
	exitUsage    = 2
	usageSummary = `pinwarden keeps container images on a Kubernetes node honest.

Usage:
  pinwarden agent    --config FILE                              run the node agent
  pinwarden verify   --config FILE [--output table|json] IMAGE... verify image references
  pinwarden prefetch --config FILE [--output table|json]        verify and pull pinned digests once
  pinwarden status   [--addr HOST:PORT] [--output table|json]   show a running agent's images
  pinwarden version                                             print version information
`
)

// usageError is a mistake on the command line or in the config: exit 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// errNotOK means the command ran but the answer is "no": exit 1.
var errNotOK = errors.New("not all images passed")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes one command and returns its exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageSummary)
		return exitUsage
	}
	stderr = lockWriter(stderr) // shared by the logger and prefetch's progress display
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	var err error
	switch args[0] {
	case "agent":
		err = cmdAgent(ctx, args[1:], stderr, logger)
	case "verify":
		err = cmdVerify(ctx, args[1:], stdout, stderr, logger)
	case "prefetch":
		err = cmdPrefetch(ctx, args[1:], stdout, stderr, logger)
	case "status":
		err = cmdStatus(ctx, args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintf(stdout, "pinwarden %s (commit %s, %s %s/%s)\n", version, commit, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return exitOK
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usageSummary)
		return exitOK
	default:
		fmt.Fprintf(stderr, "pinwarden: unknown command %q\n\n%s", args[0], usageSummary)
		return exitUsage
	}
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "pinwarden %s: %v\n", args[0], err)
		return exitUsage
	case errors.Is(err, errNotOK):
		return exitNotOK
	default:
		fmt.Fprintf(stderr, "pinwarden %s: %v\n", args[0], err)
		return exitNotOK
	}
}

// newFlags returns a flag set that reports errors instead of exiting.
func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("pinwarden "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parse parses flags, turning flag errors into usage errors.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	return nil
}

func checkOutput(o string) error {
	if o != "table" && o != "json" {
		return usageError{fmt.Errorf("--output must be table or json, got %q", o)}
	}
	return nil
}
