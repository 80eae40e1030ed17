#!/usr/bin/env bash
# Installs everything the flannel-rs tests and demo need on a fresh Debian 12 machine (root):
# Debian packages, kube-apiserver/kubectl built from source, and the kernel VM's kernel.
# Idempotent: a second run only checks. kube-apiserver is built once from Debian's
# `kubernetes` source package and cached in $KUBE_CACHE.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
KUBE_CACHE=${KUBE_CACHE:-/var/cache/flannel-rs}
KUBE_APISERVER=$KUBE_CACHE/kube-apiserver-1.20.2
KUBECTL=$KUBE_CACHE/kubectl-1.20.2
log() { echo "install-deps: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
export DEBIAN_FRONTEND=noninteractive

need_pkgs=()
for p in etcd-server etcd-client containernetworking-plugins iptables nftables iproute2 openssl iputils-ping protobuf-compiler libprotobuf-dev \
         buildah busybox-static systemd prometheus \
         curl procps kmod ca-certificates jq bc time \
         tcpdump wireguard-tools iperf3 qemu-system-x86 xz-utils ipvsadm socat; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done

# Source packages are needed only while the apiserver binary is not cached.
if [ ! -x "$KUBE_APISERVER" ] || [ ! -x "$KUBECTL" ]; then
  for p in golang-go rsync golang-github-modern-go-reflect2-dev dpkg-dev make; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
  done
  src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ] && grep -q '^Types: deb$' "$src"; then
    log "enabling deb-src in $src"
    sed -i 's/^Types: deb$/Types: deb deb-src/' "$src"
    updated=no
  fi
fi

if [ ${#need_pkgs[@]} -gt 0 ] || [ "${updated:-}" = no ]; then
  log "apt-get update"
  apt-get update -qq
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# The Debian etcd-server and prometheus packages start system services; the lab runs its own.
for svc in etcd prometheus; do
  if systemctl is-active --quiet "$svc" 2>/dev/null; then systemctl stop "$svc" || true; systemctl disable "$svc" >/dev/null 2>&1 || true; fi
done

if [ ! -x "$KUBE_APISERVER" ] || [ ! -x "$KUBECTL" ]; then
  mkdir -p "$KUBE_CACHE"
  work=$(mktemp -d /var/tmp/kube-build.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  log "building kube-apiserver and kubectl 1.20.2 from Debian's kubernetes source package in $work (about 5 minutes)"
  cd "$work"
  apt-get source --download-only kubernetes >/dev/null
  orig=$(ls kubernetes_*.orig.tar.gz | head -n1)
  mkdir src && tar -xzf "$orig" -C src --strip-components=1
  cd src
  # reflect2 1.0.1 (vendored) crashes under Go >= 1.18; use Debian's 1.0.2.
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
  find vendor/github.com/modern-go/reflect2 -name '*_test.go' -delete
  mkdir -p .go/src/k8s.io && ln -s ../../.. .go/src/k8s.io/kubernetes
  GOPATH=$PWD/.go CGO_ENABLED=0 GOFLAGS=-mod=vendor make WHAT="cmd/kube-apiserver cmd/kubectl" >build.log 2>&1 || {
    tail -n 40 build.log >&2; log "kube-apiserver build failed"; exit 1; }
  for b in kube-apiserver:"$KUBE_APISERVER" kubectl:"$KUBECTL"; do
    install -m 0755 "_output/bin/${b%%:*}" "${b#*:}.tmp" && mv "${b#*:}.tmp" "${b#*:}"
  done
  log "cached $KUBE_APISERVER and $KUBECTL"
fi
"$KUBE_APISERVER" --version >&2
"$KUBECTL" version --client --short >&2 2>/dev/null || true
# The kernel VM's kernel (Debian 12's linux-image) and initramfs, for the kernel-path tests.
bash "$HERE/kernel-vm.sh" prepare
log "ok"
