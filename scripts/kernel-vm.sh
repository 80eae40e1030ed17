#!/usr/bin/env bash
# kernel-vm.sh prepare | run SCRIPT [ARGS...]
# The project's kernel VM: Debian 12's own kernel (linux-image amd64, with the
# wireguard, ipip, sctp, ip_vs and br_netfilter modules this machine's kernel may
# lack) booted under QEMU's TCG emulation, with this machine's root filesystem
# as its root: read-only underneath (9p), a tmpfs overlay on top, so every
# binary here runs inside and nothing the VM does changes this machine. SCRIPT
# runs as root inside; its output comes back on stdout and its exit code is
# kernel-vm.sh's.
#   prepare   fetch the kernel package and build the initramfs once (cached in
#             $KVM_CACHE; scripts/install-deps.sh runs it)
#   run       boot, run SCRIPT, power off
# Why TCG: /dev/kvm may exist, but nested KVM fails on this kind of machine
# (`-cpu host`: "failed to set MSR 0x10a"). TCG boots in ~20 s and runs CPU-bound
# work several times slower than native; the kernel-path tests are sized for it.
# Env: KVM_MEM (MiB, 3072), KVM_CPUS (2), KVM_TIMEOUT (s, 1200),
#      KVM_CACHE (/var/cache/flannel-rs/kernel-vm).
set -euo pipefail
C=${KVM_CACHE:-/var/cache/flannel-rs/kernel-vm}
die() { echo "kernel-vm: $*" >&2; exit 2; }

# The cache's layout version: a change to the initramfs below bumps it.
STAMP=v2
prepare() {
  [ "$(cat "$C/ready" 2>/dev/null)" = "$STAMP" ] && return 0
  for t in qemu-system-x86_64 busybox depmod modinfo gzip xz; do
    command -v "$t" >/dev/null || die "$t missing: run scripts/install-deps.sh"
  done
  mkdir -p "$C"; rm -rf "${C:?}"/*; cd "$C"
  # linux-image-amd64 depends on the signed image, whose files are the unsigned one's.
  local pkg
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq >/dev/null
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || die "no linux-image package known to apt"
  apt-get download "${pkg%-amd64}-amd64-unsigned" >/dev/null 2>&1 || apt-get download "$pkg" >/dev/null
  dpkg-deb -x ./*.deb root && rm -f ./*.deb
  local K; K=$(ls root/lib/modules); depmod -b "$C/root" "$K"
  mkdir -p initrd/{bin,mods,proc,sys,dev,lower,upper,newroot}
  cp "$(command -v busybox)" initrd/bin/busybox
  # The modules that mount the shared root, dependencies first.
  add() { local m=$1 f d; grep -qx "$m" initrd/mods/order 2>/dev/null && return 0
    f=$(find "root/lib/modules/$K" -name "$m.ko*" | head -n1); [ -n "$f" ] || return 0
    for d in $(modinfo -F depends "$f" | tr , ' '); do add "$d"; done
    cp "$f" initrd/mods/ && echo "$m" >> initrd/mods/order; }
  for m in virtio_pci 9pnet_virtio 9p overlay; do add "$m"; done
  cat > initrd/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do
  f=$(ls /mods/$m.ko* | head -n1)
  case $f in *.xz) xz -dc "$f" > /tmp.ko && insmod /tmp.ko && rm /tmp.ko;; *) insmod "$f";; esac
done
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /lower || { echo "vm-exit=98"; echo o > /proc/sysrq-trigger; }
mount -t tmpfs tmpfs /upper; mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot
K=$(uname -r); C=$(arg kvmcache); mkdir -p /newroot/lib/modules/$K
mount --bind /newroot$C/root/lib/modules/$K /newroot/lib/modules/$K
mount --move /proc /newroot/proc; mount --move /sys /newroot/sys; mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh -c 'ln -sf /proc/self/fd /dev/fd; mount -t tmpfs tmpfs /run
  mkdir -p /dev/shm /dev/pts; mount -t tmpfs tmpfs /dev/shm; mount -t devpts devpts /dev/pts
  hostname kernel-vm; ip link set lo up
  cd "$(sed -n "s/.*kvmcwd=\([^ ]*\).*/\1/p" /proc/cmdline)" 2>/dev/null || cd /
  . "$(sed -n "s/.*kvmcmd=\([^ ]*\).*/\1/p" /proc/cmdline)"; echo "vm-exit=$?"; sync; echo o > /proc/sysrq-trigger'
INIT
  chmod +x initrd/init
  (cd initrd && find . | busybox cpio -o -H newc 2>/dev/null | gzip) > initrd.gz
  echo "$STAMP" > ready
  echo "kernel-vm: prepared $K in $C" >&2
}

run() {
  local script; script=$(readlink -f "${1:?usage: kernel-vm.sh run SCRIPT [ARGS...]}"); shift
  [ -f "$script" ] || die "no such script: $script"
  prepare
  local K; K=$(ls "$C/root/lib/modules")
  # The command the VM runs, as a file it sees through the shared root (all of
  # this machine's files are there, /tmp included: a clone under /tmp works).
  cmdf=$(mktemp /var/tmp/kvm-cmd.XXXXXX)
  log=$(mktemp /var/tmp/kvm-log.XXXXXX)
  trap 'rm -f "$cmdf" "$log"' EXIT
  { printf 'exec 2>&1\n'; printf '%q ' bash "$script" "$@"; printf '\n'; } > "$cmdf"
  timeout "${KVM_TIMEOUT:-1200}" qemu-system-x86_64 -machine accel=tcg -cpu max \
    -m "${KVM_MEM:-3072}" -smp "${KVM_CPUS:-2}" \
    -kernel "$C/root/boot/vmlinuz-$K" -initrd "$C/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet kvmcache=$C kvmcwd=$PWD kvmcmd=$cmdf" \
    -nographic -no-reboot -nic none \
    -fsdev "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap" \
    -device "virtio-9p-pci,fsdev=r,mount_tag=hostroot" </dev/null >"$log" 2>&1 || true
  local rc; rc=$(grep -a -o "vm-exit=[0-9]*" "$log" | tail -n1 | cut -d= -f2)
  grep -a -v -E '^\[ *[0-9]+\.[0-9]+\]|SeaBIOS|Booting from ROM|9p: Multiple devices|^.\[\?7l|vm-exit=' "$log" \
    | tr -d '\r' | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g'
  [ -n "$rc" ] || { echo "kernel-vm: the VM did not finish (timeout ${KVM_TIMEOUT:-1200} s or a crash)" >&2; exit 124; }
  exit "$rc"
}

case ${1:-} in
  prepare) prepare;;
  run) shift; run "$@";;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d;s/^# \{0,1\}//' >&2; exit 2;;
esac
