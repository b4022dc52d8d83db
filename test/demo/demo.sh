#!/usr/bin/env bash
# make demo: run pinwarden for real on this machine.
#
# Starts a private containerd (its own root, state and socket; nothing of the
# host's is touched) and a local registry (Debian's docker-registry), pushes
# sample images - signed, unsigned, signed with the wrong key, denied, and a
# pinned tag that is re-pushed (drift) - pulls them through CRI, runs the
# agent against them and prints what it reports. Needs root (containerd).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
export PATH="$(go env GOPATH)/bin:$PATH"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

for t in containerd docker-registry crane cosign crictl; do
  command -v "$t" >/dev/null 2>&1 || { say "installing what the demo needs (.ci/install.sh)"; bash .ci/install.sh; break; }
done
[ -x bin/pinwarden ] || make build

work=$(mktemp -d /tmp/pinwarden-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  umount -R "$work/containerd/root" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
regport=$(free_port); metricsport=$(free_port); statusport=$(free_port)
reg=127.0.0.1:$regport

say "registry (distribution) on $reg"
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<YAML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry/data}, delete: {enabled: true}}
http: {addr: $reg}
YAML
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 & pids+=($!)

# containerd 2.x when installed (go install), else Debian's 1.6.
ctrbin=$(command -v containerd)
ctrversion=$("$ctrbin" --version | awk '{print $3}')
sock=$work/containerd/containerd.sock
mkdir -p "$work/containerd/certs.d/$reg"
cat > "$work/containerd/certs.d/$reg/hosts.toml" <<TOML
server = "http://$reg"
[host."http://$reg"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
TOML
if [[ $ctrversion == 1.* ]]; then
cat > "$work/containerd/config.toml" <<TOML
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
[grpc]
  address = "$sock"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "native"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "$work/containerd/certs.d"
TOML
else
cat > "$work/containerd/config.toml" <<TOML
version = 3
root = "$work/containerd/root"
state = "$work/containerd/state"
[grpc]
  address = "$sock"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "native"
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "$work/containerd/certs.d"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "native"
TOML
fi
say "containerd $ctrversion on $sock"
"$ctrbin" --config "$work/containerd/config.toml" > "$work/containerd/log" 2>&1 & pids+=($!)
for _ in $(seq 100); do [ -S "$sock" ] && curl -sf "http://$reg/v2/" >/dev/null && break; sleep 0.1; done
printf 'runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 30\n' "$sock" "$sock" > "$work/crictl.yaml"
crictl="crictl --config $work/crictl.yaml"

say "sample images, signed with cosign"
cd "$work"
COSIGN_PASSWORD= cosign generate-key-pair --output-key-prefix ci >/dev/null 2>&1
COSIGN_PASSWORD= cosign generate-key-pair --output-key-prefix stranger >/dev/null 2>&1
image() { # image NAME:TAG CONTENT -> pushes a one-file linux/amd64 image, prints its digest
  local d; d=$(mktemp -d); echo "$2" > "$d/hello.txt"; tar -C "$d" -cf "$d/layer.tar" hello.txt
  crane append --insecure -f "$d/layer.tar" -t "$reg/$1" >/dev/null 2>&1
  crane mutate --insecure --set-platform linux/amd64 "$reg/$1" >/dev/null 2>&1
  crane digest --insecure "$reg/$1"
}
sign() { # sign KEY REPO@DIGEST
  COSIGN_PASSWORD= cosign sign --key "$1.key" --tlog-upload=false --allow-http-registry --allow-insecure-registry --yes "$2" >/dev/null 2>&1
}
signed=$(image shop/api:v1 "api v1");            sign ci "$reg/shop/api@$signed"
unsigned=$(image shop/worker:v1 "worker v1")
wrongkey=$(image shop/billing:v1 "billing v1");  sign stranger "$reg/shop/billing@$wrongkey"
denied=$(image thirdparty/tool:v1 "some tool")
web1=$(image shop/web:v1 "web v1");              sign ci "$reg/shop/web@$web1"
cachev1=$(image shop/cache:v1 "cache v1");       sign ci "$reg/shop/cache@$cachev1"
rogue=$(image shop/rogue:v1 "rogue v1")
printf '  %-28s %s\n' "shop/api:v1 (signed)" "$signed" "shop/worker:v1 (unsigned)" "$unsigned" \
  "shop/billing:v1 (wrong key)" "$wrongkey" "thirdparty/tool:v1 (denied)" "$denied" "shop/web:v1 (pinned)" "$web1" \
  "shop/cache:v1 (pinned, signed)" "$cachev1" "shop/rogue:v1 (pinned, unsigned)" "$rogue"

say "pulling through CRI"
for r in shop/api:v1 shop/worker:v1 shop/billing:v1 thirdparty/tool:v1 shop/web:v1; do $crictl pull "$reg/$r" >/dev/null; done

say "re-pushing the pinned tag shop/web:v1 (signed, but not the pinned digest) and pulling it: drift"
web2=$(image shop/web:v1 "web v1, re-pushed"); sign ci "$reg/shop/web@$web2"
$crictl pull "$reg/shop/web:v1" >/dev/null
$crictl images --digests

cat > pins.txt <<PINS
# tag pinned to the digest that was reviewed
$reg/shop/web:v1@$web1
# digests to have on the node before any pod asks (prefetch); the second is unsigned
$reg/shop/cache@$cachev1
$reg/shop/rogue@$rogue
PINS
cat > config.yaml <<YAML
runtimeEndpoint: unix://$sock
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
say "config"; cat config.yaml

say "pinwarden prefetch --config config.yaml (one-shot: verify each pinned digest, pull only the verified)"
"$root/bin/pinwarden" prefetch --config config.yaml 2>&1 && rc=0 || rc=$?
echo "exit status $rc (1: a pin was rejected; the unsigned digest was never pulled)"
$crictl images --digests | grep -E 'shop/(cache|rogue)' || true

say "running: pinwarden agent --config config.yaml"
"$root/bin/pinwarden" agent --config config.yaml > agent.log 2>&1 & agent=$!; pids+=($agent)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$metricsport/readyz" >/dev/null && break; sleep 0.1; done
# wait until nothing is pending any more (at most 10 s)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$metricsport/metrics" | grep -q '^pinwarden_images{verdict="pending"} 0' && break; sleep 0.1
done

say "pinwarden status"
"$root/bin/pinwarden" status --addr "127.0.0.1:$statusport"

say "key metrics"
curl -sf "http://127.0.0.1:$metricsport/metrics" | grep -E '^pinwarden_(images|image_problems|drifted_images|runtime_up|verifications_total|tag_digest|prefetch_total)' | grep -v ' 0$' || true

say "agent log (last lines)"
tail -n 12 agent.log
kill -TERM "$agent"; wait "$agent" && echo "agent stopped cleanly (exit 0)"
