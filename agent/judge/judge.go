// Package judge decides the verdict of one image digest: it matches the
// policy, answers from the verdict cache when it can and asks the verifier
// when it must. It is the one place where policy, cache and verification meet,
// shared by the agent loop, `pinwarden verify` and prefetch.
package judge

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// Verifier verifies a digest against a policy over the network.
type Verifier interface {
	Verify(ctx context.Context, p *policy.Policy, repo, digest string) verdict.Result
}

// Cache stores definitive verdicts by digest and policy fingerprint.
type Cache interface {
	Get(digest, fingerprint string) (verdict.Result, bool)
	Put(r verdict.Result, ttl time.Duration)
}

// Observer is told about every judgement (metrics).
type Observer interface {
	Verification(r verdict.Result, took time.Duration)
}

// Judge is safe for concurrent use. Policies and the verifier can be swapped
// at any time.
type Judge struct {
	verifier    atomic.Pointer[Verifier]
	cache       Cache // may be nil: no caching
	observer    Observer
	verifiedTTL time.Duration
	failedTTL   time.Duration
	now         func() time.Time
	set         atomic.Pointer[policy.Set]
}

// Option configures a Judge.
type Option func(*Judge)

// WithCache caches definitive verdicts: verified ones for verifiedTTL,
// unverified ones for failedTTL. Pending verdicts are never cached.
func WithCache(c Cache, verifiedTTL, failedTTL time.Duration) Option {
	return func(j *Judge) { j.cache, j.verifiedTTL, j.failedTTL = c, verifiedTTL, failedTTL }
}

// WithObserver reports every judgement.
func WithObserver(o Observer) Option { return func(j *Judge) { j.observer = o } }

// WithClock sets the clock (tests).
func WithClock(now func() time.Time) Option { return func(j *Judge) { j.now = now } }

// New returns a Judge for the policies in set.
func New(set *policy.Set, v Verifier, opts ...Option) *Judge {
	j := &Judge{now: time.Now}
	for _, o := range opts {
		o(j)
	}
	j.set.Store(set)
	j.verifier.Store(&v)
	return j
}

// SetPolicies swaps the policy set. Verdicts computed under the old
// fingerprints are no longer served: cache keys include the fingerprint.
func (j *Judge) SetPolicies(set *policy.Set) { j.set.Store(set) }

// SetVerifier swaps the verifier (a reload with new registry credentials).
// Judgements already under way finish with the old one.
func (j *Judge) SetVerifier(v Verifier) { j.verifier.Store(&v) }

// Policies returns the current policy set.
func (j *Judge) Policies() *policy.Set { return j.set.Load() }

// Judge returns the verdict for digest in repository repo (normalized).
func (j *Judge) Judge(ctx context.Context, repo, digest string) verdict.Result {
	set := j.set.Load()
	p, static := set.Decide(repo)
	if static != nil {
		r := *static
		r.Digest = digest
		r.VerifiedAt = j.now()
		j.observe(r, 0)
		return r
	}
	if j.cache != nil {
		if r, ok := j.cache.Get(digest, p.Fingerprint); ok {
			r.Source = verdict.SourceCache
			j.observe(r, 0)
			return r
		}
	}
	start := j.now()
	r := (*j.verifier.Load()).Verify(ctx, p, repo, digest)
	took := j.now().Sub(start)
	r.Digest = digest
	r.Policy = p.Name
	r.Fingerprint = p.Fingerprint
	r.Source = verdict.SourceRegistry
	if r.VerifiedAt.IsZero() {
		r.VerifiedAt = j.now()
	}
	if ctx.Err() != nil && r.Verdict != verdict.Verified {
		// Cancelled mid-way: what we have is not a judgement of the image.
		r.Verdict, r.Reason = verdict.Pending, verdict.ReasonQueued
	}
	if j.cache != nil && r.Definitive() {
		ttl := j.failedTTL
		if r.Verdict == verdict.Verified {
			ttl = j.verifiedTTL
		}
		j.cache.Put(r, ttl)
	}
	j.observe(r, took)
	return r
}

func (j *Judge) observe(r verdict.Result, took time.Duration) {
	if j.observer != nil {
		j.observer.Verification(r, took)
	}
}
