package bench

import (
	"fmt"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/loop"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

// BenchmarkLoopBuildState10k is the state the loop rebuilds on every publish
// (after each verdict, coalesced) for a node of 10,000 verified images: it
// bounds how fast a relist of 10k images can become visible and how much CPU
// a burst of changes costs.
func BenchmarkLoopBuildState10k(b *testing.B) {
	const n = 10000
	snap := make([]inventory.Image, n)
	results := make(map[string]verdict.Result, n)
	now := time.Now()
	for i := range n {
		d := fmt.Sprintf("sha256:%064x", i)
		repo := fmt.Sprintf("registry.example.com/team%d/app%d", i%50, i)
		snap[i] = inventory.Image{Digest: d, ImageID: fmt.Sprintf("sha256:%063xf", i), Repos: []string{repo},
			Tags: []string{repo + ":v1"}}
		results[d] = verdict.Result{Digest: d, Verdict: verdict.Verified, Policy: "p", Fingerprint: "fp",
			Signers: []string{"sha256:k"}, VerifiedAt: now, Source: verdict.SourceCache}
	}
	pinned := map[string]string{}
	b.ReportAllocs()
	for b.Loop() {
		st := loop.BuildState(snap, results, pinned)
		if len(st.Images) != n || st.Images[n-1].Result.Verdict != verdict.Verified {
			b.Fatal("wrong state")
		}
	}
}
