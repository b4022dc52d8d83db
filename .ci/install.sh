#!/usr/bin/env bash
# Installs everything pinwarden's tests and demo need on a fresh Debian machine
# (run as root). Idempotent: what is already there is kept.
set -euo pipefail

need_apt=()
command -v /usr/bin/containerd >/dev/null 2>&1 || need_apt+=(containerd)
command -v runc >/dev/null 2>&1 || need_apt+=(runc)
command -v docker-registry >/dev/null 2>&1 || need_apt+=(docker-registry)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v skopeo >/dev/null 2>&1 || need_apt+=(skopeo)
if ((${#need_apt[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The Debian packages start their services; tests run private instances.
  systemctl stop containerd docker-registry prometheus 2>/dev/null || true
  pkill -x docker-registry 2>/dev/null || true
  pkill -x prometheus 2>/dev/null || true
fi

gobin="$(go env GOPATH)/bin"
export PATH="$gobin:$PATH"
# containerd 2.x beside Debian's 1.6 (tests run both lines).
[ -x "$gobin/containerd" ] || go install -tags no_btrfs github.com/containerd/containerd/v2/cmd/containerd@v2.4.2
[ -x "$gobin/crictl" ] || go install sigs.k8s.io/cri-tools/cmd/crictl@v1.37.0
[ -x "$gobin/cosign" ] || go install github.com/sigstore/cosign/v2/cmd/cosign@v2.6.5
[ -x "$gobin/crane" ] || go install github.com/google/go-containerregistry/cmd/crane@v0.22.1
echo "tools ready: $(/usr/bin/containerd --version | awk '{print $3}'), $("$gobin/containerd" --version | awk '{print $3}'), cosign $("$gobin/cosign" version 2>/dev/null | awk '/GitVersion/{print $2}')"
