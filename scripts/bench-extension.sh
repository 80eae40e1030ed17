#!/usr/bin/env bash
# The extension backend at scale (root). Prints figures; asserts nothing.
#   N=1000 bash scripts/bench-extension.sh
# N extension peers are created in the lab's kube-apiserver, then one flanneld
# starts with a SubnetAddCommand that appends the peer's subnet and stdin to a
# file (the cheapest real command: one `sh -c` per peer). Reported: seconds
# until all N commands ran, CPU of the agent and of its commands, RSS, and the
# milliseconds from creating / deleting one more peer to its command's line.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}; LAB=${LAB:-benchx}; RUNS=${RUNS:-8}
[ "$(id -u)" = 0 ] || { echo "bench: run as root" >&2; exit 1; }
cargo build --release --locked --bins --example populate >/dev/null 2>&1
export FLANNELD=${FLANNELD:-$PWD/target/release/flanneld}
POP=$PWD/target/release/examples/populate
L() { bash scripts/lab.sh "$@"; }
DIR=/tmp/flannel-lab/$LAB
OUT=$DIR/calls
trap 'cp "$DIR/n1/flanneld.log" "/tmp/bench-extension-$N.log" 2>/dev/null; L down $LAB >/dev/null 2>&1 || true' EXIT
L down $LAB >/dev/null 2>&1 || true
conf=$(printf '{"Network":"10.128.0.0/9","Backend":{"Type":"extension","SubnetAddCommand":"read D; echo \\"add $SUBNET $D\\" >> %s","SubnetRemoveCommand":"read D; echo \\"del $SUBNET $D\\" >> %s"}}' "$OUT" "$OUT")
L up $LAB --nodes 1 --pod-base 10.128 --net-conf "$conf" >/dev/null 2>&1
NS=fl${LAB}-n1
pop() { ip netns exec "fl${LAB}-cp" env BACKEND=extension "$POP" "$@"; }
pop kube "$DIR/admin.kubeconfig" 0 "$N" >/dev/null
hz=$(getconf CLK_TCK)
lines() { local n; n=$(grep -c "^$1 " "$OUT" 2>/dev/null) || true; echo "${n:-0}"; }
t0=$(date +%s.%N)
pid=$(L flannel-start $LAB 1)
end=$((SECONDS + 300))
until [ "$(lines add)" -ge "$N" ]; do
  [ $SECONDS -lt $end ] || { echo "bench: not converged in 300 s" >&2; exit 1; }
  sleep 0.05
done
conv=$(echo "$(date +%s.%N) - $t0" | bc)
read -r ut st cut cst < <(awk '{print $14, $15, $16, $17}' "/proc/$pid/stat")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
# One more peer → its command's line; its deletion → the remove line (ms from the request).
event_ms() { # populate-verb k add|del
  local before; before=$(lines "$3")
  local start_ns; start_ns=$(pop "$1" "$DIR/admin.kubeconfig" "$2" 1 | head -n1)
  local e=$((SECONDS + 10))
  until [ "$(lines "$3")" -gt "$before" ]; do [ $SECONDS -lt $e ] || { echo timeout; return; }; sleep 0.002; done
  echo "scale=1; ($(date +%s%N) - $start_ns) / 1000000" | bc
}
stats() {
  printf '%s\n' "$@" | grep -v timeout | sort -n | awk '{v[NR]=$1} END {
    if (NR == 0) { print "none"; exit }
    m = (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2
    p = v[int(0.95 * NR + 0.999)]; if (p == "") p = v[NR]
    printf "median %.1f, p95 %.1f (%d runs)", m, p, NR }'
}
add=(); del=()
for j in $(seq 0 $((RUNS - 1))); do add+=("$(event_ms kube $((N + j)) add)"); done
for j in $(seq 0 $((RUNS - 1))); do del+=("$(event_ms kube-delete $((N + j)) del)"); done
c0=$(awk '{print $14 + $15}' "/proc/$pid/stat"); sleep 10; c1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
cat <<R
flannel-rs extension benchmark: N=$N ($(nproc) cores, $(uname -r))
  all N SubnetAddCommands ran (start → last line) : ${conv} s
  CPU: agent user/system, its commands user/system : $(echo "scale=2; $ut/$hz; $st/$hz; $cut/$hz; $cst/$hz" | bc | paste -sd/ -) s
  RSS after convergence                          : $((rss / 1024)) MB (${rss} kB)
  new peer → its SubnetAddCommand ran (ms)       : $(stats "${add[@]}")   [${add[*]}]
  peer deleted → SubnetRemoveCommand ran (ms)    : $(stats "${del[@]}")   [${del[*]}]
  CPU over 10 s idle                             : $(( (c1 - c0) * 1000 / hz )) ms
R
