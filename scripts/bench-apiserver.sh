#!/usr/bin/env bash
# What one agent costs the API server (root). Prints figures; asserts nothing.
#   N=5000 bash scripts/bench-apiserver.sh          (FLANNELD=... measures another build)
# The lab API server writes an audit log (LAB_AUDIT=1); the agent on node1 reaches it
# through examples/apiproxy, which can drop its connections and answer 429, and
# `kubectl proxy` behind it (plain HTTP in, TLS with the flannel service account's
# token out). Counted per agent from the audit log (user
# system:serviceaccount:kube-flannel:flannel: the agent; Nodes are created as admin)
# and from apiproxy's log:
#   (a) start with N Nodes: Node LISTs (from the watch cache or etcd, pages), WATCHes, bytes
#   (b) 10 dropped connections: LISTs and WATCHes after them; a Node created after them arrives
#   (c) kube-apiserver SIGKILL + restart: LISTs and WATCHes until the agent watches again
#   (d) 2 minutes of 429 (Retry-After: RA s): requests, gaps between them; time to resume after
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000}; LAB=${LAB:-apib}; RA=${RA:-1}; OVERLOAD=${OVERLOAD:-120}
[ "$(id -u)" = 0 ] || { echo "bench: run as root" >&2; exit 1; }
cargo build --release --locked --bins --example populate --example apiproxy >/dev/null 2>&1
export FLANNELD=${FLANNELD:-$PWD/target/release/flanneld}
POP=$PWD/target/release/examples/populate
PROXY=$PWD/target/release/examples/apiproxy
L() { bash scripts/lab.sh "$@"; }
DIR=/tmp/flannel-lab/$LAB
NS=fl${LAB}-n1
ppid=; kpid=
cleanup() {
  [ -z "$ppid" ] || kill "$ppid" 2>/dev/null || true
  [ -z "$kpid" ] || kill "$kpid" 2>/dev/null || true
  cp "$DIR/n1/flanneld.log" "/tmp/bench-apiserver-$N.log" 2>/dev/null || true
  cp "$DIR/proxy.log" "/tmp/bench-apiserver-$N.proxy.log" 2>/dev/null || true
  cp "$DIR/audit.log" "/tmp/bench-apiserver-$N.audit.log" 2>/dev/null || true
  L down $LAB >/dev/null 2>&1 || true
}
trap cleanup EXIT
L down $LAB >/dev/null 2>&1 || true
LAB_AUDIT=1 L up $LAB --mode kube --nodes 1 --pod-base 10.128 \
  --net-conf '{"Network":"10.128.0.0/9","Backend":{"Type":"vxlan"}}' >/dev/null 2>&1
AUD=$DIR/audit.log
ip netns exec "fl${LAB}-cp" "$POP" kube "$DIR/admin.kubeconfig" 0 "$N" >/dev/null
KUBECTL=${KUBECTL:-/var/cache/flannel-rs/kubectl-1.20.2}
ip netns exec "fl${LAB}-cp" "$KUBECTL" --kubeconfig "$DIR/flannel.kubeconfig" proxy \
  --address 127.0.0.1 --port 8001 --accept-hosts '.*' >"$DIR/kubectl-proxy.log" 2>&1 &
kpid=$!
ip netns exec "fl${LAB}-cp" "$PROXY" 198.18.0.1:8081 127.0.0.1:8001 "$RA" >"$DIR/proxy.log" 2>&1 &
ppid=$!
e=$((SECONDS + 20))
until ip netns exec "fl${LAB}-cp" curl -sf http://198.18.0.1:8081/version >/dev/null 2>&1; do
  [ $SECONDS -lt $e ] || { echo "bench: proxies not answering" >&2; exit 1; }; sleep 0.2
done

# The agent's requests (the flannel service account) received in [from, to), one
# "verb URI" line each. A watch is audited when it ends, so the counts are read
# after the agent has stopped; a watch open when the API server is killed is lost.
now() { date -u +%Y-%m-%dT%H:%M:%S.%6NZ; }
reqs() {
  jq -r --arg a "$1" --arg b "$2" 'select(.user.username == "system:serviceaccount:kube-flannel:flannel"
    and .stage == "ResponseComplete" and .requestReceivedTimestamp >= $a and .requestReceivedTimestamp < $b)
    | "\(.verb) \(.requestURI)"' "$AUD" 2>/dev/null || true
}
node_lists() { reqs "$1" "$2" | grep '^list /api/v1/nodes?' | grep -vc fieldSelector || true; }
cache_lists() { reqs "$1" "$2" | grep '^list /api/v1/nodes?' | grep -v fieldSelector | grep -c 'resourceVersion=0' || true; }
watches() { reqs "$1" "$2" | grep '^watch /api/v1/nodes?' | grep -vc fieldSelector || true; }
requests() { reqs "$1" "$2" | wc -l; }
bytes() { grep ' bytes ' "$DIR/proxy.log" | tail -n1 | awk '{print $3}' | grep . || echo 0; }
routes() { ip -n "$NS" route show dev flannel.1 2>/dev/null | wc -l; }
probe() { # creates Node k, prints seconds until its route is in node1's kernel (bounded)
  local k=$1 t; t=$(date +%s.%N)
  ip netns exec "fl${LAB}-cp" "$POP" kube "$DIR/admin.kubeconfig" "$k" 1 >/dev/null
  local e=$((SECONDS + 90))
  until ip -n "$NS" route show dev flannel.1 | grep -q "^$(sub "$k") "; do
    [ $SECONDS -lt $e ] || { echo "not in 90 s"; return; }; sleep 0.02
  done
  echo "$(date +%s.%N) - $t" | bc
}
sub() { local i=$((256 + $1)); echo "10.$((128 + i / 256)).$((i % 256)).0/24"; }
row() { printf '  %-44s: %s\n' "$1" "$2"; }

# (a) start
ta=$(now); b0=$(bytes); t0=$(date +%s.%N)
L flannel-start $LAB 1 --kube-api-url http://198.18.0.1:8081 >/dev/null
e=$((SECONDS + 180))
until [ "$(routes)" -ge "$N" ]; do
  [ $SECONDS -lt $e ] || { echo "bench: not converged in 180 s" >&2; tail -5 "$DIR/n1/flanneld.log" >&2; exit 1; }
  sleep 0.05
done
conv=$(echo "$(date +%s.%N) - $t0" | bc)
sleep 2
a_bytes=$(( $(bytes) - b0 ))

# (b) 10 dropped connections, 1 s apart; then a new Node must arrive by the watch.
tb=$(now); b1=$(bytes)
for _ in $(seq 10); do kill -USR1 "$ppid"; sleep 1; done
b_new=$(probe "$N")
b_bytes=$(( $(bytes) - b1 ))

# (c) kube-apiserver SIGKILL (its connections reset: the proxy drops them), restart
tc=$(now); b2=$(bytes)
L stop $LAB apiserver KILL >/dev/null
kill -USR1 "$ppid"
sleep 2
L start $LAB apiserver >/dev/null
c_back=$(probe $((N + 1)))
sleep 1
c_bytes=$(( $(bytes) - b2 ))

# (d) OVERLOAD seconds of 429s
td=$(now)
p0=$(grep -c ' 429 ' "$DIR/proxy.log" || true)
kill -USR2 "$ppid"; ton=$(date +%s%3N)
sleep "$OVERLOAD"
d_routes=$(routes)
kill -USR2 "$ppid"; toff=$(now)
d_back=$(probe $((N + 2)))
sleep 1
tend=$(now)
# The agent and kubectl proxy end: their open watches are audited.
L flannel-stop $LAB 1 TERM >/dev/null 2>&1 || true
kill "$kpid" 2>/dev/null || true; kpid=
sleep 2
gaps=$(grep ' 429 ' "$DIR/proxy.log" | tail -n +$((p0 + 1)) | awk -v on="$ton" '{ t = $1; if (NR == 1) printf "%d ", t - on; else printf "%d ", t - prev; prev = t }')
d_req=$(grep ' 429 ' "$DIR/proxy.log" | tail -n +$((p0 + 1)) | wc -l)
gapstats=$(printf '%s\n' $gaps | tail -n +2 | sort -n | awk '{v[NR]=$1} END { if (NR == 0) { print "none"; exit }
  m = (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2; printf "min %.1f s, median %.1f s, max %.1f s", v[1]/1000, m/1000, v[NR]/1000 }')
counts() { echo "$(node_lists "$1" "$2") Node LISTs ($(cache_lists "$1" "$2") from the watch cache), $(watches "$1" "$2") WATCHes, $(requests "$1" "$2") requests in all"; }

cat <<R
flannel-rs API server cost: N=$N, one agent ($FLANNELD)
 (a) start: converged in ${conv} s
$(row "requests" "$(counts "$ta" "$tb")")
$(row "bytes from the API server" "$a_bytes")
 (b) 10 dropped connections
$(row "requests" "$(counts "$tb" "$tc")")
$(row "bytes" "$b_bytes")
$(row "a Node created after them: route in (s)" "$b_new")
 (c) kube-apiserver SIGKILL, restarted 2 s later
$(row "requests" "$(counts "$tc" "$td")")
$(row "bytes" "$c_bytes")
$(row "a Node created once it answers: route in (s)" "$c_back")
 (d) ${OVERLOAD} s of 429 (Retry-After: ${RA} s)
$(row "requests answered 429" "$d_req")
$(row "first request after the 429s began (ms)" "$(echo "$gaps" | awk '{print $1}')")
$(row "gaps between requests" "$gapstats")
$(row "all gaps (ms)" "$(echo "$gaps" | cut -d' ' -f2-)")
$(row "routes kept during the 429s" "$d_routes of $((N + 2))")
$(row "a Node created as they end: route in (s)" "$d_back")
$(row "requests after the 429s" "$(counts "$toff" "$tend")")
R
