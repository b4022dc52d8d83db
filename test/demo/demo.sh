#!/usr/bin/env bash
# make demo: run pinwarden for real on this machine.
#
# Starts a private containerd (Debian's 1.6: its own root, state and sockets;
# nothing of the host's is touched) and a local registry (Debian's
# docker-registry), pushes sample images - signed, unsigned, signed with the
# wrong key, denied, and a pinned tag that is re-pushed (drift) - pulls them
# through CRI, runs the agent against them and prints what it reports. Needs
# root (containerd).
#
# Besides pinwarden it needs only two Debian packages (containerd,
# docker-registry; `.ci/install.sh demo` installs them) and test/demo/demotool,
# built here from the module's own dependencies: it generates the cosign keys,
# pushes and signs the images (cosign and go-containerregistry libraries) and
# pulls through CRI. No Go tool is installed. Every step prints its duration;
# the summary at the end shows where the time went.
#
# PINWARDEN_DEMO_CONTAINERD=/path/to/containerd runs another containerd (1.x
# or 2.x) instead of /usr/bin/containerd.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

t0=$(date +%s.%N)
step_name="" step_t=""
timings=()
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }
step_end() {
  [ -n "$step_name" ] || return 0
  local took; took=$(elapsed "$step_t")
  printf '   \033[2m(%s)\033[0m\n' "$took"
  timings+=("$(printf '%8s  %s' "$took" "$step_name")")
  step_name=""
}
# step NAME: ends the previous step (printing its duration) and starts NAME.
step() {
  step_end
  step_name=$1 step_t=$(date +%s.%N)
  printf '\n\033[1m== [%s] %s\033[0m\n' "$(elapsed "$t0")" "$*"
}

ctrbin=${PINWARDEN_DEMO_CONTAINERD:-/usr/bin/containerd}
if [ ! -x "$ctrbin" ] || ! command -v docker-registry >/dev/null 2>&1; then
  step "installing containerd and docker-registry (Debian packages: .ci/install.sh demo)"
  bash .ci/install.sh demo
fi

# progress reads `go build -v` output and shows a running count instead of
# the thousand package names: on a fresh machine the Go command downloads the
# modules and compiles about a thousand packages, most of the demo's time.
progress() {
  local n=0 m=0 last=$SECONDS line
  while IFS= read -r line; do
    case $line in
      "go: downloading "*) m=$((m + 1)) ;;
      *" "* | "#"*) printf '   %s\n' "$line" ;; # commands and compiler messages
      *) n=$((n + 1)) ;;                         # one package compiled
    esac
    if ((SECONDS - last >= 10)); then
      printf '   ... %s: %d modules downloaded, %d packages compiled\n' "$(elapsed "$step_t")" "$m" "$n"
      last=$SECONDS
    fi
  done
  printf '   %d modules downloaded, %d packages compiled\n' "$m" "$n"
}
step "building bin/pinwarden and bin/demotool (a first build downloads the modules and compiles ~1,100 packages)"
if ! { GOFLAGS=-v make --no-print-directory build &&
  CGO_ENABLED=0 GOFLAGS=-v go build -trimpath -o bin/demotool ./test/demo/demotool; } 2>&1 | progress; then
  echo "build failed" >&2
  exit 1
fi
demotool=$root/bin/demotool
pinwarden=$root/bin/pinwarden

work=$(mktemp -d /tmp/pinwarden-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  umount -R "$work/containerd/root" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

regport=$("$demotool" freeport); metricsport=$("$demotool" freeport); statusport=$("$demotool" freeport)
reg=127.0.0.1:$regport
metrics=http://127.0.0.1:$metricsport

ctrversion=$("$ctrbin" --version | awk '{print $3}')
step "registry (distribution) on $reg, containerd $ctrversion"
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<YAML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry/data}, delete: {enabled: true}}
http: {addr: $reg}
YAML
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 & pids+=($!)

# The same private layout as test/harness: own root, state, sockets (gRPC and
# ttrpc), no TCP or metrics listeners, native snapshotter, plain HTTP to the
# local registry through certs.d.
sock=$work/containerd/containerd.sock
endpoint=unix://$sock
mkdir -p "$work/containerd/certs.d/$reg"
cat > "$work/containerd/certs.d/$reg/hosts.toml" <<TOML
server = "http://$reg"
[host."http://$reg"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
TOML
common() { # common VERSION
  cat <<TOML
version = $1
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$work/containerd/opt"
TOML
}
if [[ $ctrversion == 1.* ]]; then
  { common 2; cat <<TOML
[plugins."io.containerd.grpc.v1.cri"]
  disable_cgroup = true
  disable_tcp_service = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$work/containerd/certs.d"
TOML
  } > "$work/containerd/config.toml"
else
  { common 3; cat <<TOML
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "native"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "$work/containerd/certs.d"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "native"
TOML
  } > "$work/containerd/config.toml"
fi
"$ctrbin" --config "$work/containerd/config.toml" > "$work/containerd/log" 2>&1 & pids+=($!)
"$demotool" wait-http "http://$reg/v2/" 30
"$demotool" wait-cri "$endpoint" 60 || { tail -20 "$work/containerd/log"; exit 1; }

step "sample images, signed with cosign keys (cosign library, .sig signatures)"
cd "$work"
"$demotool" keygen ci
"$demotool" keygen stranger
image() { "$demotool" image "$reg/$1" "$2"; }         # image NAME:TAG CONTENT -> digest
sign() { "$demotool" sign "$1.key" "$reg/$2"; }       # sign KEY REPO@DIGEST
signed=$(image shop/api:v1 "api v1");            sign ci "shop/api@$signed"
unsigned=$(image shop/worker:v1 "worker v1")
wrongkey=$(image shop/billing:v1 "billing v1");  sign stranger "shop/billing@$wrongkey"
denied=$(image thirdparty/tool:v1 "some tool")
web1=$(image shop/web:v1 "web v1");              sign ci "shop/web@$web1"
cachev1=$(image shop/cache:v1 "cache v1");       sign ci "shop/cache@$cachev1"
rogue=$(image shop/rogue:v1 "rogue v1")
printf '  %-34s %s\n' "shop/api:v1 (signed)" "$signed" "shop/worker:v1 (unsigned)" "$unsigned" \
  "shop/billing:v1 (wrong key)" "$wrongkey" "thirdparty/tool:v1 (denied)" "$denied" "shop/web:v1 (pinned)" "$web1" \
  "shop/cache:v1 (pinned, signed)" "$cachev1" "shop/rogue:v1 (pinned, unsigned)" "$rogue"

step "pulling through CRI"
"$demotool" pull "$endpoint" "$reg/shop/api:v1" "$reg/shop/worker:v1" "$reg/shop/billing:v1" "$reg/thirdparty/tool:v1" "$reg/shop/web:v1"

step "re-pushing the pinned tag shop/web:v1 (signed, but not the pinned digest) and pulling it: drift"
web2=$(image shop/web:v1 "web v1, re-pushed"); sign ci "shop/web@$web2"
"$demotool" pull "$endpoint" "$reg/shop/web:v1"
"$demotool" images "$endpoint"

cat > pins.txt <<PINS
# tag pinned to the digest that was reviewed
$reg/shop/web:v1@$web1
# digests to have on the node before any pod asks (prefetch); the second is unsigned
$reg/shop/cache@$cachev1
$reg/shop/rogue@$rogue
PINS
cat > config.yaml <<YAML
runtimeEndpoint: $endpoint
containerdNamespace: k8s.io
nodeName: demo-node
stateDir: $work/state
metricsAddress: 127.0.0.1:$metricsport
statusAddress: 127.0.0.1:$statusport
registries:
  insecure: ["$reg"]
policies:
  - name: shop
    images: ["$reg/shop/**"]
    keys: [ci.pub]
  - name: third-party
    images: ["$reg/thirdparty/**"]
    deny: true
pins: [pins.txt]
prefetch: {enabled: true, concurrency: 2}
kubernetes: {enabled: false}
YAML
step "config"; cat config.yaml

step "pinwarden prefetch --config config.yaml (one-shot: verify each pinned digest, pull only the verified)"
"$pinwarden" prefetch --config config.yaml 2>&1 && rc=0 || rc=$?
echo "exit status $rc (1: a pin was rejected; the unsigned digest was never pulled)"
"$demotool" images "$endpoint" | grep -E 'IMAGE|shop/(cache|rogue)' || true

step "running: pinwarden agent --config config.yaml"
"$pinwarden" agent --config config.yaml > agent.log 2>&1 & agent=$!; pids+=($agent)
"$demotool" wait-http "$metrics/readyz" 30 || { tail -20 agent.log; exit 1; }
# wait until nothing is pending any more (at most 30 s)
for _ in $(seq 300); do
  m=$("$demotool" get "$metrics/metrics") && grep -q '^pinwarden_images{verdict="pending"} 0' <<<"$m" && break; sleep 0.1
done

step "pinwarden status"
"$pinwarden" status --addr "127.0.0.1:$statusport"

step "key metrics"
"$demotool" get "$metrics/metrics" | grep -E '^pinwarden_(images|image_problems|drifted_images|runtime_up|verifications_total|tag_digest|prefetch_total)' | grep -v ' 0$' || true

step "agent log (last lines)"
tail -n 12 agent.log
kill -TERM "$agent"; wait "$agent" && echo "agent stopped cleanly (exit 0)"
step_end

printf '\n\033[1m== where the time went (total %s)\033[0m\n' "$(elapsed "$t0")"
printf '%s\n' "${timings[@]}"
