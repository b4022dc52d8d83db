#!/usr/bin/env bash
# bench/run.sh (make bench): run pinwarden's benchmarks and rewrite
# bench/RESULTS.md. Every figure in RESULTS.md comes from this script: the
# package micro-benchmarks (median of COUNT runs) and the end-to-end tests in
# bench/ (gated by PINWARDEN_BENCH=1), each row with the command that produced
# it. Needs root (private containerd), the cosign CLI and bin/pinwarden.
# Budget: about 10-15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PATH="$(go env GOPATH)/bin:$PATH"
[ -x bin/pinwarden ] || make build
export PINWARDEN_BIN=$root/bin/pinwarden
COUNT=${COUNT:-5}
BENCHTIME=${BENCHTIME:-300ms}

work=$(mktemp -d /tmp/pinwarden-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
rows=$work/rows.md
: > "$rows"
failed=0

say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

# --- package micro-benchmarks -------------------------------------------
# name-regexp|package|figure|goal (ns)|goal text
micro=(
  'BenchmarkCacheHit$|./agent/cache|cache hit (`cache.Get`, 10k entries)|1000|<= 1 µs'
  'BenchmarkJudgeCacheHit$|./bench|cache-hit verdict (`judge.Judge`: policy match + cache hit)|1000|<= 1 µs'
  'BenchmarkCheckLegacyKey/ecdsa-p256/checkLegacy$|./agent/verify|CPU per cold key-based verification, ECDSA P-256, no network (`checkLegacy`)|100000|<= 100 µs'
  'BenchmarkCheckLegacyKey/ecdsa-p256/primitive-only$|./agent/verify|the ECDSA P-256 signature check alone (sigstore `VerifySignature`), for comparison||'
  'BenchmarkCheckLegacyKey/ed25519/checkLegacy$|./agent/verify|CPU per key-based verification, Ed25519, no network|100000|<= 100 µs'
  'BenchmarkCheckLegacyKey/rsa/checkLegacy$|./agent/verify|CPU per key-based verification, RSA-2048, no network|100000|<= 100 µs'
  'BenchmarkVerifyColdKey$|./agent/verify|one cold `Verify` incl. loopback registry round trips (in-process)||'
  'BenchmarkBuildState10k$|./agent/inventory|inventory state build, 10k images (share of a full relist)||'
  'BenchmarkRelist10k$|./agent/inventory|inventory relist of 10k images against the fake runtime||'
  'BenchmarkLoopBuildState10k$|./bench|`loop.BuildState` of 10k verified images (runs on every publish)||'
)
for m in "${micro[@]}"; do
  IFS='|' read -r re pkg figure goalns goal <<<"$m"
  # -bench takes one regexp per slash-separated level.
  benchre=$(sed 's|/|$/^|g; s|^|^|' <<<"$re")
  cmd="go test -run '^\$' -bench '$benchre' -benchtime $BENCHTIME -count $COUNT -benchmem $pkg"
  say "$cmd"
  if ! out=$(eval "$cmd" 2>&1); then
    echo "$out" | tail -20 >&2
    printf '| %s | FAILED | %s | **failed** | `%s` |\n' "$figure" "$goal" "$cmd" >> "$rows"; failed=1; continue
  fi
  echo "$out" | grep -E '^Benchmark' >&2 || true
  # median ns/op, and extra metrics (requests/op, allocs/op) of the runs
  line=$(echo "$out" | awk '/^Benchmark/ {for (i=3;i<=NF;i++) if ($(i+1)=="ns/op") print $i}' | sort -g | awk '{v[NR]=$1} END {if (NR) print v[int((NR+1)/2)]}')
  extra=$(echo "$out" | awk '/^Benchmark/ {for (i=3;i<=NF;i++) if ($(i+1)=="requests/op") r=$i; else if ($(i+1)=="allocs/op") a=$i} END {s=""; if (r!="") s=s", " r " requests/op"; if (a!="") s=s", " a " allocs/op"; print s}')
  if [ -z "$line" ]; then
    printf '| %s | no result | %s | **failed** | `%s` |\n' "$figure" "$goal" "$cmd" >> "$rows"; failed=1; continue
  fi
  value=$(awk -v ns="$line" 'BEGIN { if (ns >= 1e6) printf "%.2f ms", ns/1e6; else if (ns >= 1e3) printf "%.1f µs", ns/1e3; else printf "%.0f ns", ns }')
  met=""
  if [ -n "$goalns" ]; then
    met=$(awk -v ns="$line" -v g="$goalns" 'BEGIN { print (ns <= g) ? "met" : "**missed**" }')
  fi
  printf '| %s | %s (median of %s)%s | %s | %s | `%s` |\n' "$figure" "$value" "$COUNT" "$extra" "$goal" "$met" "$cmd" >> "$rows"
done

# --- end-to-end benchmarks (bench/, PINWARDEN_BENCH=1) ---------------------
for name in TestVerifyCLI TestVerifyDistribution TestPullToVerdict TestRelistAndIdle TestPrefetchVsCrictl TestIfNotPresentImagePhase TestContainerStartToCondition; do
  cmd="PINWARDEN_BENCH=1 go test -v -count=1 -timeout 12m -run '^$name\$' ./bench"
  say "$cmd"
  # CI=true: a missing tool fails the benchmark instead of skipping its row.
  if ! CI=true PINWARDEN_BENCH=1 PINWARDEN_BENCH_OUT=$rows PINWARDEN_BENCH_CMD="$cmd" \
      go test -v -count=1 -timeout 12m -run "^$name\$" ./bench > "$work/$name.log" 2>&1; then
    tail -40 "$work/$name.log" >&2
    printf '| %s | FAILED (see the test log) | | **failed** | `%s` |\n' "$name" "$cmd" >> "$rows"; failed=1
  else
    grep -E 'RESULT|^(---|ok)' "$work/$name.log" >&2 || true
  fi
done

# --- make demo from a clean state (bench/demo.sh) -------------------------
say "bench/demo.sh: make demo with empty GOCACHE and GOMODCACHE"
bash bench/demo.sh "$rows" || failed=1

# --- RESULTS.md ------------------------------------------------------------
ctr2=$(/root/go/bin/containerd --version 2>/dev/null | awk '{print $3}' || echo "n/a")
ctr16=$(/usr/bin/containerd --version 2>/dev/null | awk '{print $3}' || echo "n/a")
cosignv=$( (cosign version 2>/dev/null || /root/go/bin/cosign version 2>/dev/null) | awk '/GitVersion/ {print $2}')
{
  cat <<EOF
# pinwarden benchmark results

Written by \`bench/run.sh\` (\`make bench\`); do not edit by hand: every figure below is produced by
the command in its row, and the whole file is rewritten on every run.

- date: $(date -u '+%Y-%m-%d %H:%M UTC')
- machine: $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -sr)
- $(go version | sed 's/^go version //; s/^/go /')
- containerd ${ctr2} (the 2.x line, used by the end-to-end benchmarks); containerd ${ctr16} (Debian) installed
- cosign CLI ${cosignv:-n/a}; $("$PINWARDEN_BIN" version 2>/dev/null | head -1)
- micro-benchmarks: median of ${COUNT} runs of -benchtime ${BENCHTIME}. The machine is shared, so
  timings are noisy: compare figures of one run as ratios, not across runs.

| figure | value | goal | | command |
| --- | --- | --- | --- | --- |
EOF
  cat "$rows"
  cat <<'EOF'

## How the end-to-end figures are measured

- **verify vs cosign** (`TestVerifyCLI`): 50 random ~1 KiB images pushed to an in-process
  go-containerregistry registry on loopback and signed with an ECDSA P-256 key (the `.sig`
  layout of `cosign sign --key`). `pinwarden verify --config FILE REPO@DIGEST...` (all 50 in
  one process, cold: the CLI has no cache) against `for r in ...; do cosign verify --key
  cosign.pub --insecure-ignore-tlog=true --allow-insecure-registry --allow-http-registry $r;
  done` over the same 50 digest references, in the same run. Registry requests are counted by
  an HTTP middleware in front of the registry, divided by 50. `pinwarden verify` runs 16
  verifications at once (`--parallel`); the agent's per-host rate limit
  (`registries.requestsPerSecond`) does not apply to the one-shot CLI.
- **pull -> verdict** (`TestPullToVerdict`): the real `bin/pinwarden agent` against a private
  containerd 2.x and a loopback registry; 100 distinct signed images are pulled one by one
  through CRI (`cri.Client.PullImage`); the latency is from `PullImage` returning to the
  digest showing `verified` on the agent's `GET /v1/images`, polled every 1 ms. Cold: first
  pull, the agent verifies against the registry. Warm: the 100 images are removed through CRI
  and pulled again, the verdicts come from the agent's cache. Requests per cold verification
  are the registry requests with pinwarden's User-Agent during the cold pulls, divided by 100;
  requests whose path names an image ID (config digest) are counted apart. Pulls run back to
  back with no pause; the agent's requests share the per-host token bucket (50/s, burst 100),
  so once the burst is spent the cold latency depends on the pull rate (shown in the row).
- **relist** (`TestRelistAndIdle`): N image records (distinct config and manifest blobs sharing
  one layer; names `repo:v1` and `repo@digest`, as a CRI pull writes them) are written straight
  into containerd's content and image stores through the containerd client, and containerd is
  restarted so that its CRI plugin loads them. containerd's root and the agent's `stateDir` are on
  tmpfs (`/dev/shm`; `PINWARDEN_BENCH_DISK=1` keeps them on disk): containerd fsyncs one bbolt
  transaction per record, which makes writing 10,000 records take minutes on disk. The verdict
  cache is warm: verified verdicts for all N digests under the config's policy fingerprint are
  written through `agent/cache` (the node's state after verifying them once; no registry holds
  10,000 signatures), the agent is started once and stopped, then started again on the same
  `stateDir`. The figure is the time from exec of that second agent to
  `pinwarden_images{verdict="verified"} N` on `/metrics` (polled every 5 ms), confirmed on
  `/v1/images`; the row names the first start's time too.
- **RSS and idle CPU** (`TestRelistAndIdle`): after that restart settles (5 s), `VmRSS` from
  `/proc/PID/status` and `utime+stime` from `/proc/PID/stat` over an idle window (60 s, or
  `PINWARDEN_BENCH_IDLE`; 20 s for the 0-image baseline), as millicores (1 millicore = 1 ms of CPU
  per second; the kernel counts in 10 ms ticks, so the resolution over 60 s is 0.17 millicores).
  Nothing polls the agent during the window. The 0-image row is the agent's baseline. RSS is
  split into anonymous memory (heap, stacks) and file-backed pages (mostly the mapped
  binary). Extra rows: the runtime's own time for the three calls of one relist, timed from a
  Go client after the agent stopped (containerd on the same 2 cores does this work during the
  agent's relist); and the RSS of a start with `GOMEMLIMIT` at the goal, as the DaemonSet sets it.
- **make demo** (`bench/demo.sh`): `make demo` with `GOCACHE` and `GOMODCACHE` set to empty
  temporary directories, so the Go command downloads every module from the proxy and compiles
  every package (pinwarden and test/demo/demotool), as on a fresh machine; Debian's containerd
  and docker-registry stay installed when they are (the row says which). The row names the
  build's share from the demo's own step timings.
- **container start -> condition** (`TestContainerStartToCondition`, issue 11): the real agent binary, a real
  kube-apiserver v1.37 on etcd and containerd 2.x running real pods through CRI (`harness.Pods`); an unsigned image
  pulled and judged first; the latency is from `RunPod` returning (CRI reports the container running) to
  `UntrustedImage` `True` on the Node read from the API server (polled every 5 ms), and from `StopPod` returning to
  `False`; 30 rounds.
- **prefetch** (`TestPrefetchVsCrictl`, `TestIfNotPresentImagePhase`, issue 5): see the comments
  on those tests in `bench/prefetch_test.go`.
EOF
} > bench/RESULTS.md
say "wrote bench/RESULTS.md"
exit $failed
