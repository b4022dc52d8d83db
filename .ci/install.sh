#!/usr/bin/env bash
# Installs what pinwarden's tests and demo need on a fresh Debian machine (run
# as root). Idempotent: what is already there is kept.
#
#   .ci/install.sh        everything make test and CI need: Debian's containerd
#                         (1.6), runc, docker-registry, prometheus (promtool) and
#                         skopeo, then `go install` of containerd v2.4.2, crictl,
#                         cosign and crane (minutes of compiling on a fresh machine)
#   .ci/install.sh demo   only what make demo needs: Debian's containerd and
#                         docker-registry (seconds; no Go tool is built)
set -euo pipefail
mode=${1:-all}
case $mode in all | demo) ;; *) echo "usage: $0 [demo]" >&2; exit 2 ;; esac

need_apt=()
command -v /usr/bin/containerd >/dev/null 2>&1 || need_apt+=(containerd)
command -v docker-registry >/dev/null 2>&1 || need_apt+=(docker-registry)
if [ "$mode" = all ]; then
  command -v runc >/dev/null 2>&1 || need_apt+=(runc)
  command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
  command -v skopeo >/dev/null 2>&1 || need_apt+=(skopeo)
fi
if ((${#need_apt[@]})); then
  echo "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The Debian packages start their services; tests and the demo run private
  # instances.
  systemctl stop containerd docker-registry prometheus 2>/dev/null || true
  pkill -x docker-registry 2>/dev/null || true
  pkill -x prometheus 2>/dev/null || true
fi
if [ "$mode" = demo ]; then
  echo "demo tools ready: containerd $(/usr/bin/containerd --version | awk '{print $3}'), $(command -v docker-registry)"
  exit 0
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
