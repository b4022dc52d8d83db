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
	"time"

	"golang.org/x/term"

	"github.com/pinwarden/pinwarden/agent"
	"github.com/pinwarden/pinwarden/agent/judge"
	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/prefetch"
	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/cri"
)

// prefetchRow is one line of `pinwarden prefetch` output.
type prefetchRow struct {
	Image       string          `json:"image"` // repo[:tag]@digest as pinned
	Digest      string          `json:"digest"`
	Result      string          `json:"result"` // present, pulled, rejected, failed
	Verdict     verdict.Verdict `json:"verdict,omitempty"`
	Reason      string          `json:"reason,omitempty"`
	ImageID     string          `json:"imageID,omitempty"`
	Attempts    int             `json:"attempts"`
	TookSeconds float64         `json:"tookSeconds"`
	Source      string          `json:"source,omitempty"` // pin file:line
	Detail      string          `json:"detail,omitempty"`
}

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
	if *cfgPath == "" || fs.NArg() > 0 {
		return usageError{errors.New("usage: pinwarden prefetch --config FILE [--output table|json]")}
	}
	s, err := agent.LoadSettings(*cfgPath)
	if err != nil {
		return usageError{err}
	}
	cfg := s.Config
	v, err := agent.NewVerifier(cfg, logger)
	if err != nil {
		return usageError{err}
	}
	rt, err := cri.Dial(ctx, cfg.RuntimeEndpoint, cfg.ContainerdNamespace)
	if err != nil {
		return usageError{fmt.Errorf("runtime %s: %w", cfg.RuntimeEndpoint, err)}
	}
	defer func() { _ = rt.Close() }() // nothing was written through it that a close error would lose

	pf := prefetch.New(judge.New(s.Policies, v), rt, logger, prefetch.Options{
		Concurrency: cfg.Prefetch.Concurrency,
		PinGC:       cfg.Prefetch.PinGC,
		Credentials: v,
		RetryBase:   time.Second,
		RetryMax:    10 * time.Second,
	})
	disp := newProgress(stderr, s.Pins, isTerminal(stderr))
	outcomes := pf.Once(ctx, s.Pins, disp.update)

	rows := make([]prefetchRow, len(outcomes))
	for i, o := range outcomes {
		rows[i] = prefetchRow{Image: o.Pin.String(), Digest: o.Pin.Digest, Result: o.Result, Verdict: o.Verdict,
			Reason: o.Reason, ImageID: o.ImageID, Attempts: o.Attempts, TookSeconds: o.Took.Seconds(),
			Source: o.Pin.Source, Detail: o.Detail}
	}
	if err := writePrefetch(stdout, *output, rows); err != nil {
		return err
	}
	for _, r := range rows {
		if r.Result != prefetch.ResultPresent && r.Result != prefetch.ResultPulled {
			return errNotOK
		}
	}
	return nil
}

func writePrefetch(w io.Writer, output string, rows []prefetchRow) error {
	if output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "RESULT\tIMAGE\tDIGEST\tVERDICT\tREASON")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Result, imageName(r.Image), status.ShortDigest(r.Digest), r.Verdict, r.Reason)
	}
	return tw.Flush()
}

// imageName drops the digest from repo[:tag]@digest (the table shows it short).
func imageName(ref string) string {
	name, _, _ := strings.Cut(ref, "@")
	return name
}

// progress shows what Once is doing: on a terminal one live line per image,
// redrawn in place; otherwise one plain line per step.
type progress struct {
	w     io.Writer
	live  bool
	index map[string]int // pin.Ref() -> line
	lines []string
	drawn int // lines currently on screen
}

func newProgress(w io.Writer, ps []pins.Pin, live bool) *progress {
	p := &progress{w: w, live: live, index: map[string]int{}}
	for i, pin := range ps {
		p.index[pin.Ref()] = i
		p.lines = append(p.lines, progressLine("waiting", pin, nil))
	}
	if p.live {
		p.draw()
	}
	return p
}

// update is called by Once, one call at a time.
func (p *progress) update(ev prefetch.Event) {
	line := progressLine(ev.Phase, ev.Pin, ev.Outcome)
	if !p.live {
		fmt.Fprintln(p.w, line)
		return
	}
	if i, ok := p.index[ev.Pin.Ref()]; ok {
		p.lines[i] = line
	}
	p.draw()
}

func (p *progress) draw() {
	var b strings.Builder
	if p.drawn > 0 {
		fmt.Fprintf(&b, "\x1b[%dA", p.drawn) // back to the first line
	}
	for _, l := range p.lines {
		b.WriteString("\x1b[2K\r")
		b.WriteString(l)
		b.WriteByte('\n')
	}
	p.drawn = len(p.lines)
	_, _ = io.WriteString(p.w, b.String()) // progress is best effort
}

func progressLine(phase string, pin pins.Pin, o *prefetch.Outcome) string {
	line := fmt.Sprintf("%-9s %s@%s", phase, imageName(pin.String()), status.ShortDigest(pin.Digest))
	if o == nil {
		return line
	}
	switch o.Result {
	case prefetch.ResultPulled:
		line += fmt.Sprintf(" (%s)", o.Took.Round(time.Millisecond))
	case prefetch.ResultRejected, prefetch.ResultFailed:
		if o.Verdict != "" {
			line += fmt.Sprintf(" (%s: %s)", o.Verdict, o.Reason)
		} else {
			line += fmt.Sprintf(" (%s)", o.Reason)
		}
	}
	return line
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := file(w)
	return ok && term.IsTerminal(int(f.Fd()))
}
