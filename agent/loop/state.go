package loop

import (
	"slices"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// BuildState derives the node's state from its images (sorted by digest),
// their verdicts (missing: pending/queued) and the tag pins (repo:tag ->
// pinned digest). The state shares the tag slices of snap's images: both
// are immutable once published.
func BuildState(snap []inventory.Image, results map[string]verdict.Result, pinned map[string]string) *nodestate.State {
	st := &nodestate.State{Images: make([]nodestate.Image, 0, len(snap))}
	for _, img := range snap {
		r, ok := results[img.Digest]
		if !ok {
			r = verdict.Result{Digest: img.Digest, Verdict: verdict.Pending, Reason: verdict.ReasonQueued}
		}
		ni := nodestate.Image{
			Digest: img.Digest, ImageID: img.ImageID, Name: primaryName(img), Tags: img.Tags,
			Result: r, Running: len(img.Containers), Pods: pods(img),
		}
		for _, tag := range img.Tags {
			if pin, ok := pinned[tag]; ok {
				ni.Pins = append(ni.Pins, nodestate.TagPin{Tag: tag, Digest: pin})
			}
		}
		st.Images = append(st.Images, ni)
	}
	return st
}

func primaryName(img inventory.Image) string {
	if len(img.Tags) > 0 {
		return img.Tags[0]
	}
	if len(img.Repos) > 0 {
		return img.Repos[0]
	}
	return img.ImageID
}

// pods returns the namespace/name of the pods running img, sorted; nil when
// none does.
func pods(img inventory.Image) []string {
	var out []string
	for _, c := range img.Containers {
		if c.PodName != "" {
			out = append(out, c.PodNamespace+"/"+c.PodName)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
