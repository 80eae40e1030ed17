#!/usr/bin/env bash
# Cluster-scale benchmark of flannel-rs in the lab (root). Prints figures; asserts nothing.
#   N=5000 MODE=kube bash scripts/bench.sh      (MODE=etcd for the etcd manager; FLANNEL_ARGS="..." adds flags)
# N peers are created in the real kube-apiserver (or etcd) as running flanneld agents
# write them (Network 10.128.0.0/9, /24 subnets, public IPs in 198.19.0.0/16 that are
# never contacted), then one flanneld starts on node1 and we report:
#   seconds until all N routes, neighbours and FDB entries are programmed,
#   RSS after convergence and peak (VmHWM), CPU seconds to converge,
#   milliseconds from creating one more peer to its FDB entry (bridge monitor),
#   CPU used over 60 s of idle.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}; MODE=${MODE:-kube}; LAB=${LAB:-bench}; IDLE=${IDLE:-60}
[ "$(id -u)" = 0 ] || { echo "bench: run as root" >&2; exit 1; }
cargo build --release --locked --bins --example populate >/dev/null 2>&1
export FLANNELD=${FLANNELD:-$PWD/target/release/flanneld}  # another build (or upstream) side by side
POP=$PWD/target/release/examples/populate
L() { bash scripts/lab.sh "$@"; }
# The agent's log is kept beside the figures (the lab itself is removed).
trap 'cp "/tmp/flannel-lab/$LAB/n1/flanneld.log" "/tmp/bench-$MODE-$N.log" 2>/dev/null; L down $LAB >/dev/null 2>&1 || true' EXIT
L down $LAB >/dev/null 2>&1 || true
L up $LAB --mode "$MODE" --nodes 1 --pod-base 10.128 \
  --net-conf '{"Network":"10.128.0.0/9","Backend":{"Type":"vxlan"}}' >/dev/null 2>&1
DIR=/tmp/flannel-lab/$LAB
NS=fl${LAB}-n1
populate() { # first count
  if [ "$MODE" = kube ]; then
    ip netns exec "fl${LAB}-cp" "$POP" kube "$DIR/admin.kubeconfig" "$1" "$2"
  else
    ip netns exec "fl${LAB}-cp" "$POP" etcd http://127.0.0.1:2379 "$1" "$2"
  fi
}
t=$(date +%s.%N); populate 0 "$N" >/dev/null; echo "populated $N peers in $(echo "$(date +%s.%N) - $t" | bc) s" >&2

count() { ip -n "$NS" "$@" 2>/dev/null | wc -l; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

t0=$(date +%s.%N)
pid=$(L flannel-start $LAB 1 ${FLANNEL_ARGS:-})  # FLANNEL_ARGS: extra flags, e.g. "--healthz-port=8471 --ip-masq"
end=$((SECONDS + 180))
until [ "$(count route show dev flannel.1)" -ge "$N" ] && [ "$(count neigh show dev flannel.1)" -ge "$N" ] \
      && [ "$(ip netns exec "$NS" bridge fdb show dev flannel.1 | grep -c self)" -ge "$N" ]; do
  [ $SECONDS -lt $end ] || { echo "bench: not converged in 180 s" >&2; tail -5 "$DIR/n1/flanneld.log" >&2; exit 1; }
  sleep 0.05
done
t1=$(date +%s.%N)
# The agent's own record of when its last apply finished (the poll above is coarser).
last=$(grep "dataplane ready: $N peers" "$DIR/n1/flanneld.log" | head -n1 | cut -d' ' -f1)
conv_log=$(echo "$(date -d "$last" +%s.%N) - $t0" | bc)
conv_poll=$(echo "$t1 - $t0" | bc)
cpu_conv=$(echo "scale=2; $(ticks "$pid") / $hz" | bc); split=$(awk -v hz="$hz" '{printf "user %.2f s, system %.2f s", $14/hz, $15/hz}' "/proc/$pid/stat")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status"); hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
rss_split=$(awk '/RssAnon|RssFile/ {printf "%s %d MB  ", $1, $2 / 1024}' "/proc/$pid/status")
# The API server's own share of converging: one list of all Nodes from its watch
# cache, as the agent asks for it (curl, best of 3; kube mode).
list_s=n/a
if [ "$MODE" = kube ]; then
  tok=$(awk '/token:/ {print $2}' "$DIR/admin.kubeconfig")
  list_s=$(for _ in 1 2 3; do ip netns exec "fl${LAB}-cp" curl -s --cacert "$DIR/pki/ca.crt" \
    -H "Authorization: Bearer $tok" -o /dev/null -w '%{time_total}\n' \
    "https://198.18.0.1:6443/api/v1/nodes?resourceVersion=0&resourceVersionMatch=NotOlderThan"; done | sort -n | head -n1)
fi

# One FDB event for MAC $1 ("add" or "del"), timed from the request: $2 = populate args.
fdb_event_ms() {
  local mac=$1 kind=$2; shift 2
  local mon=$DIR/mon.txt
  timeout 15 ip netns exec "$NS" bridge -timestamp monitor fdb >"$mon" 2>&1 &
  local mpid=$!; sleep 0.3
  local start_ns; start_ns=$(populate_cmd "$@" | head -n1)
  local pat=$mac; [ "$kind" = del ] && pat="Deleted $mac"
  local e=$((SECONDS + 10))
  until grep -q "$pat" "$mon"; do [ $SECONDS -lt $e ] || break; sleep 0.02; done
  kill "$mpid" 2>/dev/null || true; wait "$mpid" 2>/dev/null || true
  local ts; ts=$(grep -B1 "$pat" "$mon" | grep Timestamp | head -n1 | sed 's/Timestamp: //')
  [ -n "$ts" ] || { echo timeout; return; }
  local usec when
  usec=$(echo "$ts" | awk '{print $(NF-1)}'); when=$(echo "$ts" | awk '{$NF=""; $(NF-1)=""; print}')
  local fdb_ns=$(( $(date -d "$when" +%s) * 1000000000 + 10#$usec * 1000 ))
  echo "scale=1; ($fdb_ns - $start_ns) / 1000000" | bc
}
populate_cmd() { # add|del first count
  local verb=$MODE; [ "$1" = del ] && verb=$MODE-delete
  if [ "$MODE" = kube ]; then
    ip netns exec "fl${LAB}-cp" "$POP" "$verb" "$DIR/admin.kubeconfig" "$2" "$3"
  else
    ip netns exec "fl${LAB}-cp" "$POP" "$verb" http://127.0.0.1:2379 "$2" "$3"
  fi
}
mac_of() { printf '52:54:00:%02x:%02x:%02x' $(($1 >> 16 & 255)) $(($1 >> 8 & 255)) $(($1 & 255)); }
stats() { # median and p95 of the numbers given
  printf '%s\n' "$@" | grep -v timeout | sort -n | awk '{v[NR]=$1} END {
    if (NR == 0) { print "none"; exit }
    m = (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2
    p = v[int(0.95 * NR + 0.999)]; if (p == "") p = v[NR]
    printf "median %.1f, p95 %.1f (%d runs)", m, p, NR }'
}

# New peer → FDB entry, and peer removed → FDB entry gone, RUNS times each.
RUNS=${RUNS:-8}
add=(); del=()
for j in $(seq 0 $((RUNS - 1))); do
  k=$((N + j))
  add+=("$(fdb_event_ms "$(mac_of $k)" add add $k 1)")
done
for j in $(seq 0 $((RUNS - 1))); do
  k=$((N + j))
  del+=("$(fdb_event_ms "$(mac_of $k)" del del $k 1)")
done
# A burst of B peers at once → all programmed (external poll, 20 ms).
B=${B:-500}
first=$((N + 1000))
start_ns=$(populate_cmd add $first "$B" | head -n1)
e=$((SECONDS + 60))
until [ "$(ip netns exec "$NS" bridge fdb show dev flannel.1 | grep -c self)" -ge $((N + B)) ]; do
  [ $SECONDS -lt $e ] || break; sleep 0.02
done
burst_ms=$(echo "scale=1; ($(date +%s%N) - $start_ns) / 1000000" | bc)
c0=$(ticks "$pid"); sleep "$IDLE"; c1=$(ticks "$pid")
rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
idle_ms=$(( (c1 - c0) * 1000 / hz ))

cat <<R
flannel-rs benchmark: MODE=$MODE N=$N ($(nproc) cores, $(uname -r))
  converge (agent log, start → last apply) : ${conv_log} s
  converge (external poll of the kernel)   : ${conv_poll} s
  CPU to converge                          : ${cpu_conv} s (${split})
  the API server's list from its cache     : ${list_s} s (curl, best of 3)
  RSS after convergence / peak (VmHWM)     : $((rss / 1024)) MB / $((hwm / 1024)) MB  (${rss} kB / ${hwm} kB)
  RSS by kind                              : ${rss_split}
  RSS after the events below and ${IDLE} s idle : $((rss_idle / 1024)) MB  (${rss_idle} kB)
  new peer → FDB entry (ms)                : $(stats "${add[@]}")   [${add[*]}]
  peer removed → FDB entry gone (ms)       : $(stats "${del[@]}")   [${del[*]}]
  burst of $B peers → all programmed       : ${burst_ms} ms (from the first create request)
  CPU over ${IDLE} s idle                      : ${idle_ms} ms
R
