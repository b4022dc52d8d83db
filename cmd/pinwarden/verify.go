package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"text/tabwriter"

	"golang.org/x/sync/errgroup"

	"github.com/pinwarden/pinwarden/agent"
	"github.com/pinwarden/pinwarden/agent/judge"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/agent/verify"
)

// verifyRow is one line of `pinwarden verify` output.
type verifyRow struct {
	Image   string          `json:"image"`
	Digest  string          `json:"digest"`
	Verdict verdict.Verdict `json:"verdict"`
	Reason  string          `json:"reason"`
	Policy  string          `json:"policy"`
	Signers []string        `json:"signers"`
	Detail  string          `json:"detail,omitempty"`
}

func cmdVerify(ctx context.Context, args []string, stdout, stderr io.Writer, logger *slog.Logger) error {
	fs := newFlags("verify", stderr)
	cfgPath := fs.String("config", "", "config file (YAML)")
	output := fs.String("output", "table", "output format: table or json")
	parallel := fs.Int("parallel", 16, "images verified at once")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := checkOutput(*output); err != nil {
		return err
	}
	if *cfgPath == "" || fs.NArg() == 0 {
		return usageError{errors.New("usage: pinwarden verify --config FILE [--output table|json] IMAGE...")}
	}
	refs := make([]policy.Ref, fs.NArg())
	for i, a := range fs.Args() {
		r, err := policy.ParseReference(a)
		if err != nil {
			return usageError{fmt.Errorf("image %q: %w", a, err)}
		}
		refs[i] = r
	}
	s, err := agent.LoadSettings(*cfgPath)
	if err != nil {
		return usageError{err}
	}
	// The agent's per-host rate limit guards against relist storms; a
	// one-shot run over the images a user named is bounded by --parallel.
	v, err := agent.NewVerifier(s.Config, logger, func(o *verify.Options) { o.RegistryQPS = -1 })
	if err != nil {
		return usageError{err}
	}
	j := judge.New(s.Policies, v)

	rows := make([]verifyRow, len(refs))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(max(1, *parallel))
	for i, ref := range refs {
		g.Go(func() error {
			rows[i] = verifyOne(gctx, j, v, ref)
			return nil
		})
	}
	_ = g.Wait() // verifyOne reports its failures in the row
	if *output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rows); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "VERDICT\tIMAGE\tDIGEST\tREASON\tSIGNERS")
		for _, r := range rows {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Verdict, r.Image, status.ShortDigest(r.Digest), r.Reason, strings.Join(r.Signers, ","))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	for _, r := range rows {
		if r.Verdict != verdict.Verified {
			return errNotOK
		}
	}
	return nil
}

// verifyOne judges one reference. A tag is resolved to a digest once; the
// digest is what is verified (and what a tag+digest reference names).
func verifyOne(ctx context.Context, j *judge.Judge, v interface {
	Resolve(context.Context, policy.Ref) (string, error)
}, ref policy.Ref) verifyRow {
	row := verifyRow{Image: ref.String(), Digest: ref.Digest, Signers: []string{}}
	if row.Digest == "" {
		d, err := v.Resolve(ctx, ref)
		if err != nil {
			row.Verdict, row.Reason, row.Detail = verdict.Pending, verdict.ReasonRegistryError, err.Error()
			var re *verify.RegistryError
			if errors.As(err, &re) && re.Unreachable {
				row.Reason = verdict.ReasonRegistryUnreachable
			}
			return row
		}
		row.Digest = d
	}
	r := j.Judge(ctx, ref.Repo, row.Digest)
	row.Verdict, row.Reason, row.Policy, row.Detail = r.Verdict, r.Reason, r.Policy, r.Detail
	if len(r.Signers) > 0 {
		row.Signers = r.Signers
	}
	return row
}
