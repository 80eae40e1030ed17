#!/usr/bin/env bash
# Builds the flannel-rs container image with buildah (no daemon needed).
#   scripts/build-image.sh [tag]        default tag: localhost/flannel-rs:dev
# Prints the image's size. Needs root (buildah with the vfs driver and chroot isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/flannel-rs:dev}
export DEBIAN_FRONTEND=noninteractive
for p in buildah busybox-static iptables nftables; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || apt-get install -y -qq "$p" >/dev/null
done
TARGET=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --bin flanneld --target "$TARGET"
BIN=target/$TARGET/release/flanneld
ldd "$BIN" 2>&1 | grep -q "not a dynamic executable\|statically linked" || { echo "build-image: $BIN is not static" >&2; exit 1; }

ROOT=target/image-root
rm -rf "$ROOT"; mkdir -p "$ROOT"/{opt/bin,bin,sbin,usr/sbin,etc,run,tmp,var/run}
install -m 0755 "$BIN" "$ROOT/opt/bin/flanneld"
install -m 0755 /bin/busybox "$ROOT/bin/busybox"
for t in sh cp cat ls mkdir; do ln -sf busybox "$ROOT/bin/$t"; done
copy_with_libs() { # a binary and the shared libraries it loads
  local f; f=$(readlink -f "$1")
  mkdir -p "$ROOT$(dirname "$f")"; cp -L "$f" "$ROOT$f"
  ldd "$f" | awk '/=>/ {print $3} /^\t\// {print $1}' | while read -r lib; do
    [ -n "$lib" ] && [ -e "$lib" ] || continue
    mkdir -p "$ROOT$(dirname "$lib")"; cp -L "$lib" "$ROOT$lib"
  done
}
copy_with_libs /usr/sbin/xtables-nft-multi
copy_with_libs /usr/sbin/xtables-legacy-multi
copy_with_libs /usr/sbin/nft
for x in /usr/lib/x86_64-linux-gnu/xtables/*.so; do copy_with_libs "$x"; done
# Both flavours under Debian's names; flanneld picks the host's at start
# (--iptables-mode). The plain names are the nft flavour.
for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -sf /usr/sbin/xtables-nft-multi "$ROOT/usr/sbin/$t"
  ln -sf /usr/sbin/xtables-nft-multi "$ROOT/usr/sbin/${t/tables/tables-nft}"
  ln -sf /usr/sbin/xtables-legacy-multi "$ROOT/usr/sbin/${t/tables/tables-legacy}"
done
ln -sf flanneld "$ROOT/opt/bin/mk-docker-opts.sh"
ln -sf /usr/sbin/nft "$ROOT/sbin/nft" 2>/dev/null || true
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
cp /etc/protocols /etc/services "$ROOT/etc/" 2>/dev/null || true

mkdir -p "$ROOT/etc/flannel-rs"
{ echo "flannel-rs image root assembled by scripts/build-image.sh"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "flanneld: $("$BIN" --version)"
  echo "iptables: $(iptables-legacy --version) / $(iptables-nft --version)"
  echo "nft: $(nft --version)"
} >"$ROOT/etc/flannel-rs/built-by-scripts-build-image.sh"

# The context is the repository root; .containerignore lets only target/image-root in.
buildah bud --quiet --storage-driver vfs --isolation chroot -f Containerfile -t "$TAG" . >/dev/null
size=$(buildah --storage-driver vfs images --format '{{.Size}}' "$TAG" | head -n1)
echo "build-image: $TAG built, size $size (flanneld alone: $(du -h "$BIN" | cut -f1))"
