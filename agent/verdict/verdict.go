// Package verdict holds the vocabulary shared by every part of pinwarden that
// judges or reports an image digest: verdicts and their order, reasons, the
// Kubernetes event reasons and the Result record. Each of them is written
// here once.
package verdict

import "time"

// Verdict is the judgement of one image digest. See the CONTRACT in docs/.
type Verdict string

// The verdicts. Only Verified means the digest may be trusted.
const (
	Verified   Verdict = "verified"
	Unverified Verdict = "unverified"
	Untrusted  Verdict = "untrusted"
	Pending    Verdict = "pending"
	Ignored    Verdict = "ignored"
)

// All lists every verdict, in a stable order, for metrics and tables.
var All = []Verdict{Verified, Unverified, Untrusted, Pending, Ignored}

// Reasons. Each verdict accepts only some of them (see the CONTRACT).
const (
	// unverified
	ReasonNoSignature      = "no-signature"
	ReasonInvalidSignature = "invalid-signature"
	ReasonIdentityMismatch = "identity-mismatch"
	ReasonDigestMismatch   = "digest-mismatch"
	ReasonTlogMissing      = "tlog-missing"
	ReasonThresholdNotMet  = "threshold-not-met"
	ReasonTooLarge         = "too-large"
	// untrusted
	ReasonDenied   = "denied"
	ReasonNoPolicy = "no-policy"
	// pending
	ReasonQueued              = "queued"
	ReasonRegistryUnreachable = "registry-unreachable"
	ReasonRegistryError       = "registry-error"
	// drifted: the reason of a drifted problem (beside the verdict)
	ReasonPinMismatch = "pin-mismatch"
)

// Severity orders verdicts from best to worst: ignored, verified, pending,
// unverified, untrusted. An unknown verdict ranks as pending (undecided).
// The worst verdict over an image's repositories wins, and tables and
// capped metric series list the worst first.
func Severity(v Verdict) int {
	switch v {
	case Ignored:
		return 0
	case Verified:
		return 1
	case Unverified:
		return 3
	case Untrusted:
		return 4
	}
	return 2 // Pending and anything unknown
}

// Kubernetes event types and reasons of the CONTRACT, shared by the
// reporter and the prefetcher (which does not import client-go). The types
// are those of corev1.EventTypeNormal and corev1.EventTypeWarning.
const (
	EventTypeNormal  = "Normal"
	EventTypeWarning = "Warning"

	EventImageUnverified     = "ImageUnverified"
	EventImageUntrusted      = "ImageUntrusted"
	EventImageDrifted        = "ImageDrifted"
	EventImagePrefetchFailed = "ImagePrefetchFailed"
	EventImagePrefetched     = "ImagePrefetched"
	EventConfigInvalid       = "ConfigInvalid"
)

// Source tells where a Result came from.
type Source string

// Sources of a Result.
const (
	SourceCache    Source = "cache"
	SourceRegistry Source = "registry"
)

// Result is the judgement of one digest under one policy.
type Result struct {
	Digest      string    `json:"digest"`
	Verdict     Verdict   `json:"verdict"`
	Reason      string    `json:"reason,omitempty"`
	Policy      string    `json:"policy,omitempty"`      // name of the matching policy, "" when none matched
	Fingerprint string    `json:"fingerprint,omitempty"` // policy fingerprint the result was computed under
	Signers     []string  `json:"signers,omitempty"`     // key ids ("sha256:<hex of DER public key>") or identities ("issuer subject")
	VerifiedAt  time.Time `json:"verifiedAt"`            // when the result was computed
	Source      Source    `json:"source,omitempty"`
	// Detail is a human-readable explanation for logs and the CLI; never used as a metric label.
	Detail string `json:"detail,omitempty"`
}

// Definitive reports whether the verdict is final under its policy (cacheable
// for verifiedTTL or failedTTL), as opposed to pending.
func (r Result) Definitive() bool { return r.Verdict != Pending && r.Verdict != "" }
