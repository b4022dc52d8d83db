// Package nodestate is the node's judged state, the output of the node loop:
// every image digest on the node with its verdict, the containers running it
// and the drift of its pinned tags. Metrics, the status API and the
// Kubernetes reporter each derive their own view from it, so none of them is
// the input of another: changing the status JSON cannot change how a node is
// quarantined.
package nodestate

import "github.com/pinwarden/pinwarden/agent/verdict"

// State is the node's state at one moment. A published State is shared by
// every reader and must never be modified.
type State struct {
	Images []Image // one per digest, sorted by digest
}

// Image is one image digest on the node.
type Image struct {
	Digest  string
	ImageID string
	Name    string   // the first tag, else the first repository, else the image ID
	Tags    []string // repo:tag names of the image
	// Result is the worst verdict over the repositories the image is known
	// by; pending/queued until the digest has been judged.
	Result  verdict.Result
	Running int      // running containers using the image
	Pods    []string // namespace/name of the pods running it, sorted, no duplicates
	// Pins are the image's tags that a pin names, in the order of Tags.
	Pins []TagPin
}

// TagPin is a tag of the image named by a pin, and the digest pinned.
type TagPin struct {
	Tag    string // repo:tag
	Digest string // the pinned digest
}

// Drifted reports whether this pin points at another digest than the image's.
func (p TagPin) Drifted(digest string) bool { return p.Digest != digest }

// Drifted reports whether any pinned tag of the image is pinned to another
// digest: the tag drifted.
func (im *Image) Drifted() bool {
	for _, p := range im.Pins {
		if p.Drifted(im.Digest) {
			return true
		}
	}
	return false
}

// PinnedDigest is the digest that the image's pinned tags are pinned to
// (the last one when several are), "" when no tag of it is pinned.
func (im *Image) PinnedDigest() string {
	if len(im.Pins) == 0 {
		return ""
	}
	return im.Pins[len(im.Pins)-1].Digest
}

// Pinned reports whether the tag is one of the image's pinned tags.
func (im *Image) Pinned(tag string) bool {
	for _, p := range im.Pins {
		if p.Tag == tag {
			return true
		}
	}
	return false
}

// Problem tells whether the image's verdict is a problem (unverified,
// untrusted or pending): anything but verified or ignored.
func (im *Image) Problem() bool {
	switch im.Result.Verdict {
	case verdict.Unverified, verdict.Untrusted, verdict.Pending:
		return true
	}
	return false
}
