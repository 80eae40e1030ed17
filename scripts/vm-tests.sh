#!/usr/bin/env bash
# Runs inside the kernel VM (scripts/kernel-vm.sh run): the kernel-path tests of
# one test binary, e.g. `vm-tests.sh target/debug/deps/wireguard-<hash>`.
set -euo pipefail
bin=${1:?usage: vm-tests.sh TEST-BINARY [FILTER...]}; shift
echo "kernel VM: $(uname -r), $(nproc) CPUs"
# The lab's namespaces need these; the VM kernel loads the rest on demand.
mkdir -p /run/netns /var/run
# /dev/net/tun appears once the tun module is in (the userspace WireGuard needs it).
modprobe tun; modprobe wireguard; modprobe ipip; modprobe ip_vs; modprobe sctp; modprobe br_netfilter
exec "$bin" --include-ignored --test-threads=1 "${@:-kernel_vm_}"
