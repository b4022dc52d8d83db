package loop_test

import (
	"slices"
	"sort"
	"testing"
	"testing/synctest"
	"time"

	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/loop"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

func TestLoopRetriesPendingWithBackoff(t *testing.T) {
	t.Parallel()
	const base, max = 2 * time.Second, 10 * time.Second
	tests := []struct {
		name     string
		pendings int // pending verdicts before the definitive one
		final    verdict.Verdict
	}{
		{"verified after one failure", 1, verdict.Verified},
		{"unverified after five failures (capped backoff)", 5, verdict.Unverified},
		{"verified at once", 0, verdict.Verified},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				inv := newInventory(inventory.Image{Digest: dg(1), Repos: []string{"r.io/a"}})
				j := &fakeJudger{fn: func(_, _ string, n int) verdict.Result {
					if n < tt.pendings {
						return verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryUnreachable}
					}
					return verdict.Result{Verdict: tt.final, Fingerprint: "fp"}
				}}
				l := loop.New(inv, j, nil, discard(), loop.Options{RetryBase: base, RetryMax: max})
				stop := start(t, l)
				defer stop()
				l.Changed(dg(1))
				synctest.Wait()
				if img, _ := imageByDigest(l, dg(1)); tt.pendings > 0 &&
					(img.Result.Verdict != verdict.Pending || img.Result.Reason != verdict.ReasonRegistryUnreachable) {
					t.Errorf("after the first failure: %s/%s, want pending/registry-unreachable", img.Result.Verdict, img.Result.Reason)
				}
				// Long enough for every retry, and then some.
				time.Sleep(time.Duration(tt.pendings+1) * max * 2)
				synctest.Wait()

				calls := j.Calls()
				if len(calls) != tt.pendings+1 {
					t.Fatalf("judged %d times, want %d (no retries once definitive)", len(calls), tt.pendings+1)
				}
				for i := 1; i < len(calls); i++ {
					want := min(base<<(i-1), max)
					gap := calls[i].at.Sub(calls[i-1].at)
					if gap < want || gap > want+want/10 {
						t.Errorf("retry %d after %v, want %v plus up to 10%%", i, gap, want)
					}
				}
				if img, _ := imageByDigest(l, dg(1)); img.Result.Verdict != tt.final {
					t.Errorf("final verdict %s, want %s", img.Result.Verdict, tt.final)
				}
			})
		})
	}
}

// TestLoopRejudge: after a policy change every digest judged so far is
// judged again, including those whose verdict carries no fingerprint
// (no-policy), and a pending digest's backoff starts over.
func TestLoopRejudge(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		inv := newInventory(
			inventory.Image{Digest: dg(1), Repos: []string{"r.io/a"}},
			inventory.Image{Digest: dg(2), Repos: []string{"r.io/b"}},
			inventory.Image{Digest: dg(3), Repos: []string{"r.io/none"}}, // no-policy: no fingerprint
			inventory.Image{Digest: dg(4), Repos: []string{"r.io/down"}}, // pending
		)
		j := &fakeJudger{fn: func(repo, _ string, _ int) verdict.Result {
			switch repo {
			case "r.io/none":
				return verdict.Result{Verdict: verdict.Untrusted, Reason: verdict.ReasonNoPolicy}
			case "r.io/down":
				return verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryUnreachable}
			}
			return verdict.Result{Verdict: verdict.Verified, Fingerprint: "fp-" + repo}
		}}
		l := loop.New(inv, j, nil, discard(), loop.Options{RetryBase: time.Minute, RetryMax: time.Hour})
		stop := start(t, l)
		defer stop()
		l.Resync()
		synctest.Wait()
		time.Sleep(time.Minute + 7*time.Second) // the pending digest's first retry (1m, +10% at most)
		synctest.Wait()
		before := len(j.Calls())
		if before != 5 {
			t.Fatalf("judgements before Rejudge %d, want 5 (4 and one retry)", before)
		}
		l.Rejudge()
		synctest.Wait()
		var again []string
		for _, c := range j.Calls()[before:] {
			again = append(again, c.digest)
		}
		sort.Strings(again)
		if want := []string{dg(1), dg(2), dg(3), dg(4)}; !slices.Equal(again, want) {
			t.Errorf("judged again %v, want %v", again, want)
		}
		// The backoff started over: the next retry is 1m away, not 2m.
		time.Sleep(time.Minute + 7*time.Second)
		synctest.Wait()
		if n := j.CallsFor(dg(4)); n != 4 {
			t.Errorf("pending digest judged %d times, want 4 (its retry 1m after Rejudge)", n)
		}
	})
}

// A definitive verdict is re-judged when its cache entry expires, not only
// at the next relist.
func TestLoopRejudgesAtExpiry(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		v          verdict.Verdict
		verifiedAt time.Duration // how old the first verdict already is
		calls      [2]int        // judged by 59m55s and by 1h00m05s
	}{
		{"verified, expires after verifiedTTL", verdict.Verified, 0, [2]int{1, 2}},
		{"unverified, expires after failedTTL", verdict.Unverified, 0, [2]int{6, 6}}, // 0, 10m01s, ..., 50m05s
		{"verified 50m ago: expires after 10m", verdict.Verified, 50 * time.Minute, [2]int{2, 2}},
		{"untrusted never expires", verdict.Untrusted, 0, [2]int{1, 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				inv := newInventory(inventory.Image{Digest: dg(1), Repos: []string{"r.io/a"}})
				j := &fakeJudger{fn: func(_, _ string, n int) verdict.Result {
					at := time.Now()
					if n == 0 {
						at = at.Add(-tt.verifiedAt)
					}
					return verdict.Result{Verdict: tt.v, Fingerprint: "fp", VerifiedAt: at}
				}}
				l := loop.New(inv, j, nil, discard(), loop.Options{VerifiedTTL: time.Hour, FailedTTL: 10 * time.Minute})
				stop := start(t, l)
				defer stop()
				l.Changed(dg(1))
				time.Sleep(time.Hour - 5*time.Second)
				synctest.Wait()
				if n := j.CallsFor(dg(1)); n != tt.calls[0] {
					t.Fatalf("judged %d times by 59m55s, want %d", n, tt.calls[0])
				}
				time.Sleep(10 * time.Second)
				synctest.Wait()
				if n := j.CallsFor(dg(1)); n != tt.calls[1] {
					t.Fatalf("judged %d times by 1h00m05s, want %d", n, tt.calls[1])
				}
			})
		})
	}
}

// TestLoopContainerStartRejudgesPending: a digest pending for lack of
// credentials (pod pull secrets: no pod runs the image yet when it is
// pulled) is judged again as soon as a container of it starts (the
// inventory reports the digest changed), not after its retry backoff.
func TestLoopContainerStartRejudgesPending(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		inv := newInventory(inventory.Image{Digest: dg(1), Repos: []string{"r.io/private"}})
		j := &fakeJudger{fn: func(_, d string, _ int) verdict.Result {
			if img, _ := inv.Get(d); len(img.Containers) == 0 {
				return verdict.Result{Verdict: verdict.Pending, Reason: verdict.ReasonRegistryError, Detail: "401 Unauthorized"}
			}
			return verdict.Result{Verdict: verdict.Verified, Fingerprint: "fp"}
		}}
		l := loop.New(inv, j, nil, discard(), loop.Options{RetryBase: time.Hour, RetryMax: time.Hour})
		stop := start(t, l)
		defer stop()
		began := time.Now()
		l.Changed(dg(1))
		synctest.Wait()
		if img, _ := imageByDigest(l, dg(1)); img.Result.Verdict != verdict.Pending {
			t.Fatalf("pulled, no container: %s/%s, want pending", img.Result.Verdict, img.Result.Reason)
		}
		inv.mu.Lock()
		inv.imgs[dg(1)] = inventory.Image{Digest: dg(1), Repos: []string{"r.io/private"},
			Containers: []inventory.ContainerRef{{ID: "c1", PodNamespace: "shop", PodName: "api-0"}}}
		inv.mu.Unlock()
		l.Changed(dg(1)) // what the inventory reports when the container starts
		synctest.Wait()
		if img, _ := imageByDigest(l, dg(1)); img.Result.Verdict != verdict.Verified {
			t.Errorf("after the container started: %s/%s, want verified", img.Result.Verdict, img.Result.Reason)
		}
		if n, took := j.CallsFor(dg(1)), time.Since(began); n != 2 || took >= time.Hour {
			t.Errorf("judged %d times within %v, want 2 without waiting for the backoff", n, took)
		}
	})
}
