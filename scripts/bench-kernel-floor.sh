#!/usr/bin/env bash
# The kernel's own cost for upstream's vxlan entries, without any agent: N permanent
# neighbours, N FDB entries and N routes `<subnet> via <subnet addr> dev flannel.1 onlink`
# inserted with `ip -batch` / `bridge -batch` into a throwaway namespace (root).
# Prints figures; asserts nothing. No agent can program the same state for less.
#   N=5000 bash scripts/bench-kernel-floor.sh
set -euo pipefail
N=${N:-5000}
[ "$(id -u)" = 0 ] || { echo "bench: run as root" >&2; exit 1; }
NS=flkfloor-$$
TMP=$(mktemp -d)
trap 'ip netns del "$NS" 2>/dev/null || true; rm -rf "$TMP"' EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add eth0 type veth peer name eth1
ip -n "$NS" addr add 198.18.0.11/16 dev eth0
ip -n "$NS" link set eth0 up
ip -n "$NS" link set eth1 up
ip -n "$NS" link add flannel.1 type vxlan id 1 local 198.18.0.11 dev eth0 dstport 8472 nolearning
ip -n "$NS" link set flannel.1 up
ip -n "$NS" addr add 10.128.0.0/32 dev flannel.1
for k in $(seq 1 "$N"); do
  net="10.$((128 + k / 256)).$((k % 256)).0"
  mac=$(printf '52:54:00:%02x:%02x:%02x' $((k >> 16 & 255)) $((k >> 8 & 255)) $((k & 255)))
  echo "neigh replace $net lladdr $mac dev flannel.1 nud permanent" >>"$TMP/neigh"
  echo "fdb replace $mac dev flannel.1 dst 198.19.$((k >> 8 & 255)).$((k & 255)) self permanent" >>"$TMP/fdb"
  echo "route replace $net/24 via $net dev flannel.1 onlink" >>"$TMP/route"
  echo "route replace $net/24 dev flannel.1" >>"$TMP/route-nogw"
done
t() { # t <label> <cmd...>: user and system seconds of one batch
  local s; s=$( { /usr/bin/time -f '%U %S %e' "${@:2}" >/dev/null; } 2>&1 | tail -n1)
  printf '  %-44s: user %s s, system %s s, wall %s s\n' "$1" $s
}
echo "kernel floor for N=$N upstream vxlan entries ($(nproc) cores, $(uname -r))"
t "neighbours (permanent)" ip -n "$NS" -batch "$TMP/neigh"
t "FDB entries (self permanent)" ip netns exec "$NS" bridge -batch "$TMP/fdb"
t "routes via <subnet addr> onlink (upstream)" ip -n "$NS" -batch "$TMP/route"
ip -n "$NS" route flush dev flannel.1 proto boot 2>/dev/null || true
t "routes without a gateway (comparison)" ip -n "$NS" -batch "$TMP/route-nogw"
