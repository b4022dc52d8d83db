#!/usr/bin/env bash
# bench/demo.sh [ROWS]: how long `make demo` takes from a clean state, the
# first-run experience of a new user (issue 9: <= 3 minutes, pinwarden's
# build included). The Go build cache and module cache are empty temporary
# directories (GOCACHE, GOMODCACHE), so every module is downloaded from the Go
# proxy and every package compiled; the Debian packages the demo installs
# (containerd, docker-registry) stay installed if they are. Appends a row to
# ROWS (bench/run.sh's RESULTS.md table), else prints it. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-/dev/stdout}
tmp=$(mktemp -d /tmp/pinwarden-demo-bench.XXXXXX)
trap 'chmod -R u+w "$tmp" 2>/dev/null || true; rm -rf "$tmp"' EXIT
cmd='GOCACHE=$(mktemp -d) GOMODCACHE=$(mktemp -d) make demo'
goal=180

load=$(cut -d' ' -f1 /proc/loadavg)
apt="already installed"
{ [ -x /usr/bin/containerd ] && command -v docker-registry >/dev/null; } || apt="installed by the demo"
echo "== $cmd (load average $load; containerd/docker-registry $apt)" >&2
start=$(date +%s.%N)
status=ok
GOCACHE=$tmp/gocache GOMODCACHE=$tmp/gomodcache GOFLAGS=-modcacherw make demo > "$tmp/demo.log" 2>&1 || status=failed
took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
# The demo's own summary: where the time went.
steps=$(sed -n '/where the time went/,$p' "$tmp/demo.log" | tail -n +2 | sed 's/\x1b\[[0-9;]*m//g')
echo "$steps" >&2
build=$(echo "$steps" | awk '/building/ {print $1; exit}')
if [ "$status" != ok ] || ! grep -q 'agent stopped cleanly' "$tmp/demo.log"; then
  tail -40 "$tmp/demo.log" >&2
  printf '| `make demo` from a clean state | FAILED after %ss | <= 3 min | **failed** | `%s` |\n' "$took" "$cmd" >> "$rows"
  exit 1
fi
met=met; ((took <= goal)) || met="**missed**"
printf '| `make demo` from a clean state: empty Go build and module caches (modules from the Go proxy), Debian containerd and docker-registry %s; of it the build of bin/pinwarden and bin/demotool %s; load average %s at the start | %dm%02ds | <= 3 min | %s | `%s` |\n' \
  "$apt" "${build:-?}" "$load" $((took / 60)) $((took % 60)) "$met" "$cmd" >> "$rows"
