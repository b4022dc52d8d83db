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
# containerd 2.x needs its own shim first on PATH (Debian's 1.6 shim fails under it).
[ -x "$gobin/containerd-shim-runc-v2" ] || go install github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@v2.4.2

# A real control plane for the Kubernetes tests: Debian's etcd and kube-apiserver
# and kubectl built from k8s.io/kubernetes (no release binaries: only the Go
# proxy is reachable). Built once, cached in $gobin.
command -v etcd >/dev/null 2>&1 || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
  systemctl stop etcd 2>/dev/null || true
  systemctl disable etcd 2>/dev/null || true
}
kube_version=v1.37.2
if [ ! -x "$gobin/kube-apiserver" ] || [ ! -x "$gobin/kubectl" ]; then
  kdir="$(mktemp -d)"
  (
    cd "$kdir"
    go mod init pinwarden.local/kubebuild >/dev/null 2>&1
    # kubernetes' go.mod points every k8s.io staging module at v0.0.0 and
    # replaces it with ./staging/...: replace each with its published v0.x.
    kmod="$(go mod download -json "k8s.io/kubernetes@$kube_version" | sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p')"
    staging_version="v0.${kube_version#v1.}"
    {
      echo "require k8s.io/kubernetes $kube_version"
      sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$kmod" | while read -r m; do
        echo "replace $m v0.0.0 => $m $staging_version"
      done
    } >>go.mod
    cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    go mod tidy
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$gobin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$gobin/kubectl" k8s.io/kubernetes/cmd/kubectl
  )
  rm -rf "$kdir"
fi

echo "tools ready: $(/usr/bin/containerd --version | awk '{print $3}'), $("$gobin/containerd" --version | awk '{print $3}'), cosign $("$gobin/cosign" version 2>/dev/null | awk '/GitVersion/{print $2}')"
echo "control plane: etcd $(etcd --version | awk '/etcd Version/{print $3}'), $("$gobin/kube-apiserver" --version)"
