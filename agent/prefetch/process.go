package prefetch

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/cri"
)

// process makes one attempt at one pin: present? judge; verified (or
// ignored by policy)? pull by digest, then pin against GC.
func (p *Prefetcher) process(ctx context.Context, pin pins.Pin, phase func(string)) Outcome {
	start := p.now()
	o := Outcome{Pin: pin}
	done := func(result string) Outcome {
		o.Result, o.Took = result, p.now().Sub(start)
		return o
	}
	ref := pin.Ref()
	phase(PhaseChecking)
	st, err := p.rt.ImageStatus(ctx, ref)
	if err != nil {
		o.Reason, o.Detail = ReasonRuntimeError, err.Error()
		return done(ResultFailed)
	}
	if st != nil {
		o.ImageID = st.ID
		p.pinGC(ctx, ref, st.Pinned)
		return done(ResultPresent)
	}

	phase(PhaseVerifying)
	r := p.judge.Judge(ctx, pin.Repo, pin.Digest)
	o.Verdict, o.Reason, o.Detail = r.Verdict, r.Reason, r.Detail
	switch r.Verdict {
	case verdict.Verified, verdict.Ignored:
	case verdict.Unverified, verdict.Untrusted:
		return done(ResultRejected)
	default:
		if o.Verdict == "" {
			o.Verdict = verdict.Pending
		}
		if o.Reason == "" {
			o.Reason = verdict.ReasonQueued
		}
		return done(ResultFailed)
	}

	unlock, err := p.digests.lock(ctx, pin.Digest)
	if err != nil {
		o.Reason, o.Detail = ReasonPullFailed, err.Error()
		return done(ResultFailed)
	}
	defer unlock()
	// Another attempt may have pulled the same reference while we waited.
	if st, err := p.rt.ImageStatus(ctx, ref); err == nil && st != nil {
		o.ImageID = st.ID
		p.pinGC(ctx, ref, st.Pinned)
		return done(ResultPresent)
	}
	phase(PhasePulling)
	pctx, cancel := context.WithTimeout(ctx, p.opts.PullTimeout)
	id, err := p.rt.PullImage(pctx, ref, p.auth(pin.Repo))
	cancel()
	if err != nil {
		o.Reason, o.Detail = ReasonPullFailed, err.Error()
		return done(ResultFailed)
	}
	o.ImageID = id
	p.pinGC(ctx, ref, false)
	return done(ResultPulled)
}

// pinGC labels the image name ref against kubelet's GC when PinGC is on. A
// failure is logged; the next recheck tries again.
func (p *Prefetcher) pinGC(ctx context.Context, ref string, pinned bool) {
	if !p.opts.PinGC || pinned {
		return
	}
	if err := p.rt.PinImage(ctx, ref); err != nil {
		p.log.Warn("could not pin the prefetched image against kubelet's image GC", "image", ref, "err", err)
	}
}

// auth returns the credentials for the registry host of repo (a normalized
// repository), never those of another host; nil when there are none.
func (p *Prefetcher) auth(repo string) *cri.Auth {
	if p.opts.Credentials == nil {
		return nil
	}
	host, _, _ := strings.Cut(repo, "/")
	ac, ok := p.opts.Credentials.Credentials(host)
	if !ok || (ac.Username == "" && ac.Password == "" && ac.IdentityToken == "" && ac.RegistryToken == "") {
		return nil
	}
	return &cri.Auth{Username: ac.Username, Password: ac.Password, IdentityToken: ac.IdentityToken, RegistryToken: ac.RegistryToken}
}

// keyLock is a mutex per key (digest): one pull of a digest at a time.
type keyLock struct {
	mu   sync.Mutex               // guards held
	held map[string]chan struct{} // closed on unlock
}

func (k *keyLock) lock(ctx context.Context, key string) (func(), error) {
	for {
		k.mu.Lock()
		ch, busy := k.held[key]
		if !busy {
			ch = make(chan struct{})
			k.held[key] = ch
			k.mu.Unlock()
			return func() {
				k.mu.Lock()
				delete(k.held, key)
				k.mu.Unlock()
				close(ch)
			}, nil
		}
		k.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for another pull of %s: %w", key, ctx.Err())
		}
	}
}
