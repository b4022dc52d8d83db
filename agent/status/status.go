// Package status serves the node's images and verdicts as JSON on
// GET /v1/images and reads them back for `pinwarden status`. The JSON is a
// view of the node state (agent/nodestate), never an input of anything else.
package status

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// Image is one image digest on the node, as the CONTRACT's status API shows it.
type Image struct {
	Image             string          `json:"image"` // first tag, or the repository
	Tags              []string        `json:"tags"`
	Digest            string          `json:"digest"`
	ImageID           string          `json:"imageID"`
	Verdict           verdict.Verdict `json:"verdict"`
	Reason            string          `json:"reason"`
	Drifted           bool            `json:"drifted"`
	PinnedDigest      string          `json:"pinnedDigest"`
	RunningContainers int             `json:"runningContainers"`
	Pods              []string        `json:"pods"` // namespace/name
	Signers           []string        `json:"signers"`
	VerifiedAt        *time.Time      `json:"verifiedAt"`
	Source            verdict.Source  `json:"source"`
	Policy            string          `json:"policy,omitempty"`
}

// FromNode is the status view of one image of the node state.
func FromNode(im *nodestate.Image) Image {
	out := Image{
		Image: im.Name, Tags: nonNil(im.Tags), Digest: im.Digest, ImageID: im.ImageID,
		Verdict: im.Result.Verdict, Reason: im.Result.Reason, Drifted: im.Drifted(), PinnedDigest: im.PinnedDigest(),
		RunningContainers: im.Running, Pods: nonNil(im.Pods), Signers: nonNil(im.Result.Signers),
		Source: im.Result.Source, Policy: im.Result.Policy,
	}
	if at := im.Result.VerifiedAt; !at.IsZero() {
		out.VerifiedAt = &at
	}
	return out
}

// FromState is the status view of a node state, one Image per digest.
func FromState(st *nodestate.State) []Image {
	out := make([]Image, len(st.Images))
	for i := range st.Images {
		out[i] = FromNode(&st.Images[i])
	}
	return out
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// Source provides the current node state. Implementations must be safe for
// concurrent use; the state is shared and never modified.
type Source interface {
	State() *nodestate.State
}

// Path is the API path of the image list.
const Path = "/v1/images"

// Handler serves GET /v1/images from src.
func Handler(src Source) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+Path, func(w http.ResponseWriter, _ *http.Request) {
		var imgs []nodestate.Image
		if st := src.State(); st != nil {
			imgs = st.Images
		}
		w.Header().Set("Content-Type", "application/json")
		_ = writeJSON(w, imgs) // the client went away; nothing to do
	})
	return mux
}

// writeJSON writes the status view of imgs exactly as a json.Encoder with
// SetIndent("", "  ") would write FromState's slice, one image at a time:
// encoding 10,000 images at once would build the whole document in memory
// twice (encoding, then indenting), megabytes of garbage per request.
func writeJSON(w io.Writer, imgs []nodestate.Image) error {
	if len(imgs) == 0 {
		_, err := io.WriteString(w, "[]\n")
		return err
	}
	bw := bufio.NewWriterSize(w, 32<<10)
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("  ", "  ")
	bw.WriteString("[\n")
	for i := range imgs {
		buf.Reset()
		im := FromNode(&imgs[i])
		if err := enc.Encode(&im); err != nil {
			return fmt.Errorf("encode image: %w", err)
		}
		bw.WriteString("  ")
		bw.Write(bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
		if i < len(imgs)-1 {
			bw.WriteString(",")
		}
		bw.WriteString("\n")
	}
	bw.WriteString("]\n")
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write images: %w", err)
	}
	return nil
}

// ErrUnreachable means the agent could not be reached.
var ErrUnreachable = errors.New("agent unreachable")

// Fetch asks the agent at addr (host:port) for its images.
func Fetch(ctx context.Context, client *http.Client, addr string) ([]Image, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+Path, nil)
	if err != nil {
		return nil, fmt.Errorf("status request: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, errors.Join(ErrUnreachable, fmt.Errorf("GET %s: %w", Path, err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, errors.Join(ErrUnreachable, fmt.Errorf("GET %s: HTTP %d", Path, resp.StatusCode))
	}
	var imgs []Image
	if err := json.NewDecoder(io.LimitReader(resp.Body, 256<<20)).Decode(&imgs); err != nil {
		return nil, fmt.Errorf("decode %s: %w", Path, err)
	}
	return imgs, nil
}

// WriteTable prints images as a table that fits an 80-column terminal:
// verdict, image, short digest, running containers, reason. A drifted image
// has "drifted" first in its reason; `--output json` has the pinned digest.
func WriteTable(w io.Writer, imgs []Image) error {
	const imageWidth, reasonWidth = 27, 20 // 10+2+27+2+12+2+3+2+20 = 80
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VERDICT\tIMAGE\tDIGEST\tRUN\tREASON")
	for _, im := range worstFirst(imgs) {
		reason := im.Reason
		if im.Drifted {
			reason = strings.TrimSuffix("drifted,"+reason, ",")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", im.Verdict, Ellipsize(im.Image, imageWidth),
			ShortDigest(im.Digest), im.RunningContainers, truncate(reason, reasonWidth))
	}
	return tw.Flush()
}

// ShortDigest returns the first 12 hex characters of a digest.
func ShortDigest(d string) string {
	_, hex, ok := strings.Cut(d, ":")
	if !ok {
		hex = d
	}
	if len(hex) > 12 {
		hex = hex[:12]
	}
	return hex
}

// Ellipsize shortens s to n runes, keeping its end (the tag is the useful part).
func Ellipsize(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return "…" + string(r[len(r)-n+1:])
}

// truncate shortens s to n runes, keeping its start.
func truncate(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}

// worstFirst returns imgs sorted for a person: worst verdict first, drifted
// before clean within a verdict, running before idle, then by image and digest.
func worstFirst(imgs []Image) []Image {
	out := slices.Clone(imgs)
	slices.SortStableFunc(out, func(a, b Image) int {
		return cmp.Or(
			-cmp.Compare(verdict.Severity(a.Verdict), verdict.Severity(b.Verdict)),
			-cmp.Compare(boolInt(a.Drifted), boolInt(b.Drifted)),
			-cmp.Compare(min(a.RunningContainers, 1), min(b.RunningContainers, 1)),
			strings.Compare(a.Image, b.Image),
			strings.Compare(a.Digest, b.Digest))
	})
	return out
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
