#!/usr/bin/env bash
# WireGuard benchmarks in the lab (root). Prints figures; asserts nothing.
#   bash scripts/bench-wireguard.sh converge     N WireGuard peers (N=1000) → one agent:
#        converge time, CPU, RSS, and one new/removed peer → device (agent log stamps)
#   bash scripts/bench-wireguard.sh throughput   two nodes, a pod on each: iperf3 TCP
#        throughput and ping RTT over vxlan and WireGuard (kernel where the kernel has
#        it, else userspace; WG_IMPL=kernel|userspace forces one)
#   bash scripts/bench-wireguard.sh vm           both, inside the kernel VM (Debian's
#        kernel with the wireguard module, TCG-emulated: absolute figures are slow,
#        compare rows within one run)
# Env: N, RUNS (8), WG_IMPL (auto), SECS (iperf3 seconds, 5), IMPLS (throughput rows).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench: run as root" >&2; exit 1; }
what=${1:-converge}
if [ "$what" = vm ]; then
  cargo build --release --locked --bins --example populate >/dev/null 2>&1
  exec bash scripts/kernel-vm.sh run scripts/bench-wireguard.sh vm-inside
fi
if [ "$what" = vm-inside ]; then
  modprobe tun; modprobe wireguard; mkdir -p /run/netns
  export SKIP_BUILD=1 IMPLS="vxlan kernel userspace"
  N=${N:-1000} WG_IMPL=kernel bash scripts/bench-wireguard.sh converge
  N=${N:-1000} WG_IMPL=userspace bash scripts/bench-wireguard.sh converge
  exec bash scripts/bench-wireguard.sh throughput
fi
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked --bins --example populate >/dev/null 2>&1
export FLANNELD=${FLANNELD:-$PWD/target/release/flanneld}
POP=$PWD/target/release/examples/populate
L() { bash scripts/lab.sh "$@"; }
LAB=wgbench; DIR=/tmp/flannel-lab/$LAB
trap 'L down $LAB >/dev/null 2>&1 || true' EXIT
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
stamp() { date -d "$1" +%s%N; }  # an agent log timestamp → ns

converge() {
  local N=${N:-1000} RUNS=${RUNS:-8}
  L down $LAB >/dev/null 2>&1 || true
  L up $LAB --nodes 1 --pod-base 10.128 \
    --net-conf '{"Network":"10.128.0.0/9","Backend":{"Type":"wireguard"}}' >/dev/null 2>&1
  BACKEND=wireguard ip netns exec "fl${LAB}-cp" "$POP" kube "$DIR/admin.kubeconfig" 0 "$N" >/dev/null
  local t0; t0=$(date +%s%N)
  local pid; pid=$(FLANNEL_WG_IMPL=${WG_IMPL:-auto} L flannel-start $LAB 1)
  local end=$((SECONDS + 300))
  until grep -q "dataplane ready: $N peers" "$DIR/n1/flanneld.log"; do
    [ $SECONDS -lt $end ] || { echo "bench: not converged" >&2; tail -5 "$DIR/n1/flanneld.log" >&2; return 1; }
    sleep 0.05
  done
  local ready; ready=$(stamp "$(grep "dataplane ready: $N peers" "$DIR/n1/flanneld.log" | head -n1 | cut -d' ' -f1)")
  local conv; conv=$(echo "scale=2; ($ready - $t0) / 1000000000" | bc)
  local cpu; cpu=$(echo "scale=2; $(ticks "$pid") / $hz" | bc)
  local rss hwm; rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status"); hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  local flavor; flavor=$(grep -o "(kernel)\|(userspace)" "$DIR/n1/flanneld.log" | head -n1)
  # One peer added, then removed: from the create/delete request to the agent's
  # log line for the apply that put it on (took it off) the device.
  local add=() del=() k before start line
  for j in $(seq 0 $((RUNS - 1))); do
    for verb in kube kube-delete; do
      k=$((N + j))
      before=$(grep -c "wireguard peers) in" "$DIR/n1/flanneld.log" || true)
      start=$(BACKEND=wireguard ip netns exec "fl${LAB}-cp" "$POP" $verb "$DIR/admin.kubeconfig" $k 1 | head -n1)
      end=$((SECONDS + 10))
      until [ "$(grep -c "wireguard peers) in" "$DIR/n1/flanneld.log")" -gt "$before" ]; do
        [ $SECONDS -lt $end ] || break; sleep 0.01
      done
      line=$(grep "wireguard peers) in" "$DIR/n1/flanneld.log" | tail -n1 | cut -d' ' -f1)
      ms=$(echo "scale=1; ($(stamp "$line") - $start) / 1000000" | bc)
      if [ $verb = kube ]; then add+=("$ms"); else del+=("$ms"); fi
    done
  done
  local c0; c0=$(ticks "$pid"); sleep 30; local idle=$(( ($(ticks "$pid") - c0) * 1000 / hz ))
  cat <<R
wireguard converge: N=$N peers $flavor ($(nproc) cores, $(uname -r))
  converge (start → all peers on the device) : ${conv} s
  CPU to converge                            : ${cpu} s
  RSS after convergence / peak               : $((rss / 1024)) MB / $((hwm / 1024)) MB
  new peer → on the device (ms)              : ${add[*]}
  peer removed → off the device (ms)         : ${del[*]}
  CPU over 30 s idle                         : ${idle} ms
R
  L down $LAB >/dev/null 2>&1 || true
}

throughput() {
  local SECS=${SECS:-5} row
  for row in ${IMPLS:-vxlan wireguard}; do
    local conf='{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}' imp=${WG_IMPL:-auto}
    case $row in
      vxlan) conf='{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}';;
      kernel|userspace) imp=$row;;
    esac
    L down $LAB >/dev/null 2>&1 || true
    L up $LAB --nodes 2 --mode etcd --net-conf "$conf" >/dev/null 2>&1
    for n in 1 2; do FLANNEL_WG_IMPL=$imp L flannel-start $LAB $n >/dev/null; done
    local a b end=$((SECONDS + 60))
    a=$(L pod-add $LAB 1 a); b=$(L pod-add $LAB 2 b)
    until L ping $LAB n1-a "$b" 1 0.2 >/dev/null 2>&1; do [ $SECONDS -lt $end ] || break; sleep 0.2; done
    local flavor=vxlan
    [ "$row" = vxlan ] || flavor="wireguard $(grep -o "(kernel)\|(userspace)" "$DIR/n1/flanneld.log" | head -n1)"
    L exec $LAB n2-b timeout $((SECS + 20)) iperf3 -s -1 >/dev/null 2>&1 &
    local srv=$!; sleep 1
    local bps; bps=$(L exec $LAB n1-a iperf3 -c "$b" -t "$SECS" -J 2>/dev/null | jq '.end.sum_received.bits_per_second' || echo 0)
    wait "$srv" 2>/dev/null || true
    local rtt; rtt=$(L ping $LAB n1-a "$b" 200 0.01 2>/dev/null | awk -F/ '/^rtt/ {print $5 " ms avg, " $7 " mdev"}')
    printf 'pod → pod over %-22s: %6.0f Mbit/s TCP (iperf3 %s s), RTT %s\n' "$flavor" "$(echo "$bps / 1000000" | bc -l)" "$SECS" "$rtt"
  done
  L down $LAB >/dev/null 2>&1 || true
}

case $what in
  converge) converge;;
  throughput) throughput;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d;s/^# \{0,1\}//' >&2; exit 2;;
esac
