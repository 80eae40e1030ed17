#!/usr/bin/env bash
# NetworkPolicy benchmark in the lab (root). Prints figures; asserts nothing.
#   PODS=10000 POLICIES=500 ROUNDS=20 bash scripts/bench-policy.sh
# PODS Pod objects (every 100th on node1, the agent's node) and POLICIES
# NetworkPolicies are created in the real kube-apiserver (examples/policy_bench.rs),
# then flanneld --network-policy starts on node1 and we report: seconds until the
# policy table is first written, RSS, nft objects, and per change (pod relabelled,
# pod added, policy changed) the time from the API write to the kernel's table
# changing (its first nftables notification in the node), then CPU over IDLE seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PODS=${PODS:-10000}; POLICIES=${POLICIES:-500}; ROUNDS=${ROUNDS:-20}; LAB=${LAB:-pbench}; IDLE=${IDLE:-30}
[ "$(id -u)" = 0 ] || { echo "bench-policy: run as root" >&2; exit 1; }
cargo build --release --locked --bins --example policy_bench >/dev/null 2>&1
export FLANNELD=${FLANNELD:-$PWD/target/release/flanneld}
PB=$PWD/target/release/examples/policy_bench
L() { bash scripts/lab.sh "$@"; }
trap 'cp "/tmp/flannel-lab/$LAB/n1/flanneld.log" "/tmp/bench-policy-$PODS.log" 2>/dev/null; L down $LAB >/dev/null 2>&1 || true' EXIT
L down $LAB >/dev/null 2>&1 || true
L up $LAB --nodes 1 >/dev/null 2>&1
DIR=/tmp/flannel-lab/$LAB
KC=$DIR/admin.kubeconfig
L kubectl $LAB apply -f deploy/network-policy-rbac.yml >/dev/null
ip netns exec "fl${LAB}-cp" "$PB" populate "$KC" "$PODS" "$POLICIES"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
t0=$(date +%s.%N)
pid=$(L flannel-start $LAB 1 --network-policy --healthz-port=8471 ${FLANNEL_ARGS:-})
end=$((SECONDS + 180))
until grep -q "network policy: enforcing [0-9]* policies" "$DIR/n1/flanneld.log"; do
  [ $SECONDS -lt $end ] || { echo "bench-policy: no enforcement in 180 s" >&2; tail -5 "$DIR/n1/flanneld.log" >&2; exit 1; }
  sleep 0.05
done
first=$(echo "$(date +%s.%N) - $t0" | bc)
line=$(grep -m1 "network policy: enforcing [0-9]* policies" "$DIR/n1/flanneld.log")
sleep 2
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status"); hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
objs=$(ip netns exec "fl${LAB}-n1" curl -s http://127.0.0.1:8471/metrics | awk '/^flannel_policy_nft_objects / {print $2}')
elems=$(ip netns exec "fl${LAB}-n1" nft list table inet flannel-policy | grep -c "" || true)
# The API server's own share of the first enforcement: one list of all Pods from
# its watch cache, as the agent asks for it (curl, best of 3, the agent idle).
tok=$(awk '/token:/ {print $2}' "$KC")
list_s=$(for _ in 1 2 3; do ip netns exec "fl${LAB}-cp" curl -s --cacert "$DIR/pki/ca.crt" \
  -H "Authorization: Bearer $tok" -o /dev/null -w '%{time_total} %{size_download}\n' \
  "https://198.18.0.1:6443/api/v1/pods?resourceVersion=0&resourceVersionMatch=NotOlderThan"; done | sort -n | head -n1)
echo "flannel-rs NetworkPolicy benchmark: PODS=$PODS POLICIES=$POLICIES (2 cores, $(uname -r))"
echo "  first enforcement after start          : ${first} s  (${line#*network policy: })"
echo "  the API server's list of all Pods      : ${list_s% *} s, $(( ${list_s#* } / 1048576 )) MB (from its cache; curl, best of 3)"
echo "  RSS after sync / peak (VmHWM)          : $((rss / 1024)) MB / $((hwm / 1024)) MB  (${rss} kB / ${hwm} kB)"
echo "  nft objects (sets+elements+chains+rules+map entries): ${objs}; table listing ${elems} lines"
ip netns exec "fl${LAB}-cp" "$PB" changes "$KC" "$ROUNDS" "/run/netns/fl${LAB}-n1"
c0=$(ticks "$pid"); sleep "$IDLE"; c1=$(ticks "$pid")
rss2=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
echo "  RSS after the changes and ${IDLE} s idle   : $((rss2 / 1024)) MB"
echo "  CPU over ${IDLE} s idle                     : $(( (c1 - c0) * 1000 / hz )) ms"
ip netns exec "fl${LAB}-n1" curl -s http://127.0.0.1:8471/metrics | grep "^flannel_policy_enforce_seconds_\(sum\|count\)" | sed 's/^/  agent: /'
