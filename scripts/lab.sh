#!/usr/bin/env bash
# The flannel-rs test lab: a flannel cluster made of Linux network namespaces.
#
#   LAN        netns <P>lan: bridge br0
#   control    netns <P>cp : eth0 198.18.0.1/16, etcd + kube-apiserver (TLS, token auth, RBAC)
#   node i     netns <P>n<i>: eth0 198.18.0.<10+i>/16, default via 198.18.0.1, flanneld
#   pod        netns <P>n<i>-<pod>: eth0 from the real `bridge` CNI plugin + host-local IPAM
#   --ip dual|6: the LAN also carries IPv6 (cp fd00:198:18::1/64, node i fd00:198:18::<10+i>/64)
#              and Node i gets the pod CIDR fd00:10:244:<i-1>::/64 (with its IPv4 one, or alone)
#
# Nothing is created in the machine's own network namespace: every `ip` call
# names its namespace. Every wait is bounded. `down` ends only the processes
# whose pids it recorded.
#
# usage: lab.sh <command> <lab> [args]
#   up <lab> [--nodes N] [--mode kube|etcd] [--net-conf JSON] [--no-nodes-in-api] [--pod-base A.B]
#            [--ip 4|dual|6]
#   node-add <lab> <i> [--no-api]        add node namespace i (and its Node object)
#   node-object <lab> <i>                create Node object node<i> (podCIDR 10.244.<i-1>.0/24)
#   flannel-start <lab> <i> [flanneld args...]   (env: NET_CONF, WIREGUARD_KEY_FILE, FLANNEL_WG_IMPL)
#   flannel-stop <lab> <i> [TERM|KILL]
#   pod-add <lab> <i> <pod>              prints the pod's IP (IPv4 if it has one)
#   pod-ip <lab> <i> <pod> 4|6           the pod's address in one family
#   ping <lab> <from-pod> <ip> [count] [interval]
#   dump <lab> <i>                       routes, neighbours, FDB, flannel device, subnet.env
#   kubectl <lab> [args...]              as cluster admin
#   etcdctl <lab> [args...]
#   exec <lab> <netns-suffix> <cmd...>   run a command in one of the lab's namespaces
#   signal <lab> <etcd|apiserver> <SIG>  e.g. STOP/CONT to freeze and thaw the control plane
#   etcd-restart <lab> [etcd args...]    stop etcd (TERM) and start it again on the same data
#                                        (extra args, e.g. --auth-token-ttl 3, are kept for later starts)
#   stop <lab> <etcd|apiserver> [SIG]    end it (KILL for a crash), keeping its data
#   start <lab> <etcd|apiserver>         start it again on the same data; waits until it answers
#   etcd-tls <lab>                       a second etcd on :2381 requiring client certificates
#   down <lab>
# env LAB_AUDIT=1 at `up`: the API server writes an audit log, $DIR/audit.log
#   (see scripts/bench-apiserver.sh)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP=$(dirname "$HERE")
KUBE_CACHE=${KUBE_CACHE:-/var/cache/flannel-rs}
KUBE_APISERVER=${KUBE_APISERVER:-$KUBE_CACHE/kube-apiserver-1.20.2}
KUBECTL=${KUBECTL:-$KUBE_CACHE/kubectl-1.20.2}
FLANNELD=${FLANNELD:-$TOP/target/debug/flanneld}
CNI_PATH=${CNI_PATH:-/usr/lib/cni}
CP_IP=198.18.0.1

die() { echo "lab: $*" >&2; exit 1; }
log() { echo "lab: $*" >&2; }

cmd=${1:-}; lab=${2:-}
[ -n "$cmd" ] && [ -n "$lab" ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d;s/^# \{0,1\}//' >&2; exit 2; }
shift 2
[[ "$lab" =~ ^[a-z0-9]{1,8}$ ]] || die "lab name must be 1-8 lowercase letters/digits"
P="fl${lab}-"
DIR=${LAB_ROOT:-/tmp/flannel-lab}/$lab
mkdir -p "$DIR"

ns() { echo "${P}$1"; }
ipv4_network() { # 10.244.1.1/24 -> 10.244.1.0/24
  local ip=${1%/*} len=${1#*/} a b c d
  IFS=. read -r a b c d <<<"$ip"
  local n=$(( (a << 24 | b << 16 | c << 8 | d) & (0xffffffff << (32 - len)) & 0xffffffff ))
  echo "$((n >> 24 & 255)).$((n >> 16 & 255)).$((n >> 8 & 255)).$((n & 255))/$len"
}
# netns_exec <netns> <cmd...>: `ip netns exec`, which needs / to be a mount point.
# Inside a chroot (e.g. ../shared/tools/fresh-machine.sh) it is not; there the same is
# done by hand: enter the net namespace, and in a private mount namespace mount that
# namespace's sysfs over /sys (private first, so nothing propagates to the host).
# LAB_NSENTER=1 takes that path anywhere (to test it).
# The test is the operation itself: `ip netns exec` makes / a slave mount, which fails
# where / is not a mount point (mountpoint(1) and mountinfo cannot tell in a chroot).
if [ -z "${LAB_NSENTER:-}" ] && unshare --mount --propagation slave true 2>/dev/null; then
  NETNS_BY_HAND=""
else
  NETNS_BY_HAND=1
fi
# Replaces the calling (sub)shell, so `netns_exec_bg ... &` records the command's own pid.
netns_exec_bg() {
  local n=$1; shift
  [ -n "$NETNS_BY_HAND" ] || exec ip netns exec "$n" "$@"
  exec nsenter --net="/run/netns/$n" -- unshare --mount --propagation unchanged -- \
    sh -c 'mount --make-rprivate /sys && mount -t sysfs sysfs /sys && exec "$@"' sh "$@"
}
netns_exec() { ( netns_exec_bg "$@" ); }
# `ip -n <netns> ...` switches namespaces the same way, so it gets the same treatment.
ipn() {
  local n=$1; shift
  if [ -z "$NETNS_BY_HAND" ]; then ip -n "$n" "$@"; else netns_exec "$n" ip "$@"; fi
}
in_ns() { local n=$1; shift; netns_exec "$(ns "$n")" "$@"; }
node_ip() { echo "198.18.0.$((10 + $1))"; }
CP_IP6=fd00:198:18::1
node_ip6() { echo "fd00:198:18::$((10 + $1))"; }
ipfam() { cat "$DIR/ip" 2>/dev/null || echo 4; }
has_v4() { [ "$(ipfam)" != 6 ]; }
has_v6() { [ "$(ipfam)" != 4 ]; }

# wait_for <seconds> <description> <command...>: bounded poll.
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { log "timed out after ${secs}s waiting for $what"; return 1; }
    sleep 0.2
  done
}

start_bg() { # start_bg <name> <netns> <cmd...>: records the pid in $DIR/<name>.pid
  local name=$1 n=$2; shift 2
  netns_exec_bg "$(ns "$n")" "$@" >"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

stop_pid() { # stop_pid <pidfile> [signal]: TERM (or the signal), bounded wait, then KILL
  local f=$1 sig=${2:-TERM} pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -s "$sig" "$pid" 2>/dev/null || true
    local end=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; }
  fi
  rm -f "$f"
}

kubectl_() { in_ns cp "$KUBECTL" --kubeconfig "$DIR/admin.kubeconfig" "$@"; }

make_certs() {
  local d=$DIR/pki; mkdir -p "$d"
  [ -f "$d/apiserver.crt" ] && return 0
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=flannel-lab-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$d/apiserver.key" -out "$d/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:%s,IP:127.0.0.1,DNS:localhost,DNS:kubernetes\nextendedKeyUsage=serverAuth\n' "$CP_IP" >"$d/ext.cnf"
  openssl x509 -req -in "$d/apiserver.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 2 -extfile "$d/ext.cnf" -out "$d/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  local admin flannel
  admin=$(openssl rand -hex 16); flannel=$(openssl rand -hex 16)
  cat >"$d/tokens.csv" <<T
$admin,admin,admin,"system:masters"
$flannel,system:serviceaccount:kube-flannel:flannel,flannel-uid,"system:serviceaccounts,system:serviceaccounts:kube-flannel"
T
  kubeconfig "$admin" admin >"$DIR/admin.kubeconfig"
  kubeconfig "$flannel" flannel >"$DIR/flannel.kubeconfig"
}

kubeconfig() {
  cat <<K
apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: https://$CP_IP:6443
    certificate-authority: $DIR/pki/ca.crt
users:
- name: $2
  user:
    token: $1
contexts:
- name: lab
  context: {cluster: lab, user: $2}
current-context: lab
K
}

make_lan() {
  ip netns list | grep -qw "$(ns lan)" && return 0
  ip netns add "$(ns lan)"
  ipn "$(ns lan)" link set lo up
  ipn "$(ns lan)" link add br0 type bridge
  ipn "$(ns lan)" link set br0 up
}

attach() { # attach <ns-suffix> <port-name> <ip/len> [gw] [ip6/len] [gw6]
  local n=$1 port=$2 addr=$3 gw=${4:-} addr6=${5:-} gw6=${6:-}
  ip netns add "$(ns "$n")"
  ipn "$(ns "$n")" link set lo up
  ipn "$(ns lan)" link add "$port" type veth peer name eth0 netns "$(ns "$n")"
  ipn "$(ns lan)" link set "$port" master br0 up
  ipn "$(ns "$n")" addr add "$addr" dev eth0
  [ -z "$addr6" ] || ipn "$(ns "$n")" addr add "$addr6" dev eth0 nodad
  ipn "$(ns "$n")" link set eth0 up
  [ -z "$gw" ] || ipn "$(ns "$n")" route add default via "$gw"
  [ -z "$gw6" ] || ipn "$(ns "$n")" -6 route add default via "$gw6"
}

start_etcd() {
  mkdir -p "$DIR/etcd"
  local extra=()
  [ ! -s "$DIR/etcd.args" ] || read -r -a extra <"$DIR/etcd.args"
  start_bg etcd cp etcd --name lab --data-dir "$DIR/etcd" "${extra[@]}" \
    --listen-client-urls "http://127.0.0.1:2379,http://$CP_IP:2379" \
    --advertise-client-urls "http://$CP_IP:2379" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster lab=http://127.0.0.1:2380
  # /version answers without credentials, also once auth is enabled.
  wait_for 30 etcd in_ns cp curl -sf http://127.0.0.1:2379/version
}

etcd_tls() {
  local d=$DIR/pki
  openssl req -newkey rsa:2048 -nodes -subj "/CN=etcd" -keyout "$d/etcd.key" -out "$d/etcd.csr" 2>/dev/null
  printf 'subjectAltName=IP:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' "$CP_IP" >"$d/etcd.cnf"
  openssl x509 -req -in "$d/etcd.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
    -extfile "$d/etcd.cnf" -out "$d/etcd.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=flanneld" -keyout "$d/client.key" -out "$d/client.csr" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >"$d/client.cnf"
  openssl x509 -req -in "$d/client.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
    -extfile "$d/client.cnf" -out "$d/client.crt" 2>/dev/null
  mkdir -p "$DIR/etcd-tls"
  start_bg etcd-tls cp etcd --name tls --data-dir "$DIR/etcd-tls" \
    --listen-client-urls "https://$CP_IP:2381" --advertise-client-urls "https://$CP_IP:2381" \
    --listen-peer-urls http://127.0.0.1:2382 --initial-advertise-peer-urls http://127.0.0.1:2382 \
    --initial-cluster tls=http://127.0.0.1:2382 \
    --cert-file "$d/etcd.crt" --key-file "$d/etcd.key" --trusted-ca-file "$d/ca.crt" --client-cert-auth
  local tlsctl=(etcdctl --endpoints "https://$CP_IP:2381" --cacert "$d/ca.crt" --cert "$d/client.crt" --key "$d/client.key")
  wait_for 30 "etcd with TLS" in_ns cp "${tlsctl[@]}" endpoint health
  in_ns cp "${tlsctl[@]}" put /coreos.com/network/config "$(cat "$DIR/net-conf.json")" >/dev/null
  echo "$d"
}

up_control_plane() {
  make_certs
  if has_v6; then attach cp cp "$CP_IP/16" "" "$CP_IP6/64"; else attach cp cp "$CP_IP/16"; fi
  start_etcd
  [ "${MODE:-kube}" = kube ] || return 0
  start_apiserver
  wait_for 30 "RBAC bootstrap" kubectl_ get clusterrole cluster-admin
  kubectl_ apply -f "$TOP/deploy/kube-flannel.yml" >/dev/null
}

start_apiserver() {
  [ -x "$KUBE_APISERVER" ] || die "$KUBE_APISERVER missing: run scripts/install-deps.sh"
  # LAB_AUDIT=1 at `up` (kept for restarts): an audit log of every node, pod,
  # namespace and policy request (verb, URI, user, user agent, code) in $DIR/audit.log.
  local audit=()
  [ "${LAB_AUDIT:-0}" = 1 ] && touch "$DIR/audit-on"
  if [ -e "$DIR/audit-on" ]; then
    cat >"$DIR/audit-policy.yaml" <<'A'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  resources:
  - {group: "", resources: [nodes, pods, namespaces]}
  - {group: networking.k8s.io, resources: [networkpolicies]}
- level: None
A
    audit=(--audit-policy-file "$DIR/audit-policy.yaml" --audit-log-path "$DIR/audit.log")
  fi
  start_bg apiserver cp "$KUBE_APISERVER" ${audit[@]+"${audit[@]}"} \
    --etcd-servers http://127.0.0.1:2379 \
    --bind-address "$CP_IP" --advertise-address "$CP_IP" --secure-port 6443 --insecure-port 0 \
    --tls-cert-file "$DIR/pki/apiserver.crt" --tls-private-key-file "$DIR/pki/apiserver.key" \
    --token-auth-file "$DIR/pki/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$DIR/pki/sa.pub" --service-account-signing-key-file "$DIR/pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 --allow-privileged=true \
    --feature-gates IPv6DualStack=true \
    --enable-priority-and-fairness=false --profiling=false --logtostderr=true --v=0
  wait_for 90 "kube-apiserver" kubectl_ get --raw /readyz
}

node_object() {
  local i=$1 base; base=$(cat "$DIR/pod-base" 2>/dev/null || echo 10.244)
  local cidrs=() v6; v6="fd00:10:244:$(printf %x $((i - 1)))::/64"
  [ "$i" != 1 ] || v6="fd00:10:244::/64"
  has_v4 && cidrs+=("$base.$((i - 1)).0/24")
  has_v6 && cidrs+=("$v6")
  local list; list=$(IFS=,; echo "${cidrs[*]}")
  kubectl_ create -f - >/dev/null <<N
apiVersion: v1
kind: Node
metadata:
  name: node$i
  labels: {kubernetes.io/os: linux, kubernetes.io/hostname: node$i}
spec:
  podCIDR: ${cidrs[0]}
  podCIDRs: [$list]
N
}

node_add() {
  local i=$1 api=${2:-yes}
  if has_v6; then
    attach "n$i" "v$i" "$(node_ip "$i")/16" "$CP_IP" "$(node_ip6 "$i")/64" "$CP_IP6"
    in_ns "n$i" sysctl -qw net.ipv6.conf.all.forwarding=1
  else
    attach "n$i" "v$i" "$(node_ip "$i")/16" "$CP_IP"
  fi
  in_ns "n$i" sysctl -qw net.ipv4.ip_forward=1
  mkdir -p "$DIR/n$i"
  if [ "$api" = yes ] && [ -f "$DIR/apiserver.pid" ]; then node_object "$i"; fi
}

cmd_up() {
  local nodes=0 api=yes
  MODE=kube
  NETCONF='{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) nodes=$2; shift 2;;
      --mode) MODE=$2; shift 2;;
      --net-conf) NETCONF=$2; shift 2;;
      --no-nodes-in-api) api=no; shift;;
      --pod-base) echo "$2" >"$DIR/pod-base"; shift 2;;
      --ip) case $2 in 4) echo 4;; dual) echo 46;; 6) echo 6;; *) die "--ip 4|dual|6";; esac >"$DIR/ip"; shift 2;;
      *) die "up: unknown option $1";;
    esac
  done
  echo "$MODE" >"$DIR/mode"
  printf '%s\n' "$NETCONF" >"$DIR/net-conf.json"
  make_lan
  up_control_plane
  if [ "$MODE" = etcd ]; then
    in_ns cp etcdctl --endpoints http://127.0.0.1:2379 put /coreos.com/network/config "$NETCONF" >/dev/null
  fi
  for i in $(seq 1 "$nodes"); do node_add "$i" "$api"; done
  log "lab $lab is up ($MODE mode, $nodes nodes) in $DIR"
}

cmd_flannel_start() {
  local i=$1; shift
  local mode; mode=$(cat "$DIR/mode")
  [ -x "$FLANNELD" ] || die "$FLANNELD not built"
  local args=(--subnet-file "$DIR/n$i/subnet.env")
  if [ "$mode" = kube ]; then
    # NET_CONF: this node's own net-conf file (e.g. another PSK); default the lab's.
    args+=(--kube-subnet-mgr --kubeconfig-file "$DIR/flannel.kubeconfig" --net-config-path "${NET_CONF:-$DIR/net-conf.json}")
  else
    args+=(--etcd-endpoints "http://$CP_IP:2379")
  fi
  # As in the DaemonSet, the node can also be found through the agent's own pod
  # (POD_NAME/POD_NAMESPACE set by the caller); otherwise NODE_NAME names it.
  local who=(NODE_NAME="node$i")
  [ -z "${POD_NAME:-}" ] || who=(-u NODE_NAME POD_NAME="$POD_NAME" POD_NAMESPACE="${POD_NAMESPACE:-kube-flannel}")
  # Each node keeps its own WireGuard key (upstream's /run/flannel/wgkey is one host's).
  netns_exec_bg "$(ns "n$i")" env "${who[@]}" RUST_LOG="${RUST_LOG:-info}" \
    WIREGUARD_KEY_FILE="${WIREGUARD_KEY_FILE:-$DIR/n$i/wgkey}" FLANNEL_WG_SOCKET_DIR="$DIR/n$i/wireguard" \
    "$FLANNELD" "${args[@]}" "$@" >>"$DIR/n$i/flanneld.log" 2>&1 &
  echo $! >"$DIR/n$i/flanneld.pid"
  echo $!
}

cmd_pod_add() {
  local i=$1 pod=$2
  local env="$DIR/n$i/subnet.env"
  wait_for 30 "$env" test -s "$env"
  local FLANNEL_NETWORK="" FLANNEL_SUBNET="" FLANNEL_IPV6_NETWORK="" FLANNEL_IPV6_SUBNET=""
  # shellcheck disable=SC1090
  . "$env"
  local podns; podns=$(ns "n$i-$pod")
  ip netns add "$podns"
  ipn "$podns" link set lo up
  local ipmasq=true; [ "${FLANNEL_IPMASQ:-false}" = true ] && ipmasq=false
  # The configuration the flannel CNI plugin hands to `bridge`: one range and
  # one route per family that subnet.env carries.
  local ranges=() routes=()
  if [ -n "$FLANNEL_SUBNET" ]; then
    ranges+=("[{\"subnet\":\"$(ipv4_network "$FLANNEL_SUBNET")\"}]")
    routes+=("{\"dst\":\"$FLANNEL_NETWORK\"}")
  fi
  if [ -n "$FLANNEL_IPV6_SUBNET" ]; then
    ranges+=("[{\"subnet\":\"${FLANNEL_IPV6_SUBNET%%::*}::/${FLANNEL_IPV6_SUBNET#*/}\"}]")
    routes+=("{\"dst\":\"$FLANNEL_IPV6_NETWORK\"}")
  fi
  local conf
  conf=$(cat <<C
{"cniVersion":"0.3.1","name":"cbr0","type":"bridge","bridge":"cni0","isGateway":true,
 "isDefaultGateway":true,"hairpinMode":true,"ipMasq":$ipmasq,"mtu":$FLANNEL_MTU,
 "ipam":{"type":"host-local","dataDir":"$DIR/n$i/ipam",
   "ranges":[$(IFS=,; echo "${ranges[*]}")],"routes":[$(IFS=,; echo "${routes[*]}")]}}
C
)
  local out
  out=$(echo "$conf" | netns_exec "$(ns "n$i")" env CNI_COMMAND=ADD CNI_CONTAINERID="$pod" \
    CNI_NETNS="/run/netns/$podns" CNI_IFNAME=eth0 CNI_PATH="$CNI_PATH" "$CNI_PATH/bridge") \
    || die "bridge plugin failed: $out"
  local ip4 ip6
  ip4=$(echo "$out" | jq -r '[.ips[].address | select(contains(".")) | split("/")[0]][0] // empty')
  ip6=$(echo "$out" | jq -r '[.ips[].address | select(contains(":")) | split("/")[0]][0] // empty')
  [ -n "$ip4$ip6" ] || die "no IP in CNI result: $out"
  [ -z "$ip4" ] || echo "$ip4" >"$DIR/n$i/pod-$pod.ip"
  [ -z "$ip6" ] || echo "$ip6" >"$DIR/n$i/pod-$pod.ip6"
  echo "${ip4:-$ip6}"
}

cmd_pod_ip() {
  local i=$1 pod=$2 fam=$3 f
  case $fam in 4) f="$DIR/n$i/pod-$pod.ip";; 6) f="$DIR/n$i/pod-$pod.ip6";; *) die "pod-ip: 4 or 6";; esac
  [ -s "$f" ] || die "pod $pod on node $i has no IPv$fam address"
  cat "$f"
}

cmd_dump() {
  local i=$1 n dev; n=$(ns "n$i")
  local devs; devs=$( { ipn "$n" -o link show type vxlan; ipn "$n" -o link show type wireguard; ipn "$n" -o link show type tun; } 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1)
  echo "== node$i ($(node_ip "$i"))"
  for dev in $devs; do
    echo "-- ip -d link show $dev"; ipn "$n" -d link show "$dev"
    echo "-- ip addr show $dev"; ipn "$n" addr show "$dev" | grep -v 'scope link'
  done
  echo "-- ip route"; ipn "$n" route
  if has_v6; then echo "-- ip -6 route"; ipn "$n" -6 route; fi
  for dev in $devs; do
    echo "-- ip neigh show dev $dev"; ipn "$n" neigh show dev "$dev"
    echo "-- bridge fdb show dev $dev"; netns_exec "$n" bridge fdb show dev "$dev"
  done
  echo "-- cat subnet.env"; cat "$DIR/n$i/subnet.env" 2>/dev/null || echo "(none)"
}

cmd_down() {
  local f
  for f in "$DIR"/n*/flanneld.pid "$DIR"/*.pid; do [ -e "$f" ] && stop_pid "$f"; done
  # Namespaces: pods first, nodes, control plane, LAN last.
  local n
  for n in $(ip netns list | awk '{print $1}' | grep "^${P}" | sort -r); do
    ip netns pids "$n" 2>/dev/null | while read -r pid; do
      # Only processes running in the lab's own namespaces.
      kill -KILL "$pid" 2>/dev/null || true
    done
    ip netns delete "$n" 2>/dev/null || true
  done
  rm -rf "$DIR"
  log "lab $lab is down"
}

case $cmd in
  up) cmd_up "$@";;
  node-add) i=$1; shift; if [ "${1:-}" = --no-api ]; then node_add "$i" no; else node_add "$i" yes; fi;;
  node-object) node_object "$1";;
  flannel-start) cmd_flannel_start "$@";;
  flannel-stop) stop_pid "$DIR/n$1/flanneld.pid" "${2:-TERM}";;
  pod-add) cmd_pod_add "$@";;
  pod-ip) cmd_pod_ip "$@";;
  ping) podfrom=$1; ip=$2; count=${3:-3}; interval=${4:-0.2}
        n=$(ip netns list | awk '{print $1}' | grep -- "-${podfrom}$" | grep "^${P}" | head -n1)
        [ -n "$n" ] || die "no pod $podfrom"
        netns_exec "$n" ping -n -q -c "$count" -i "$interval" -W 2 "$ip";;
  dump) cmd_dump "$@";;
  kubectl) kubectl_ "$@";;
  etcdctl) in_ns cp etcdctl --endpoints http://127.0.0.1:2379 "$@";;
  exec) n=$1; shift; in_ns "$n" "$@";;
  etcd-restart) stop_pid "$DIR/etcd.pid" TERM; [ $# = 0 ] || echo "$*" >"$DIR/etcd.args"; start_etcd;;
  stop) [[ "$1" =~ ^(etcd|apiserver)$ ]] || die "stop: etcd or apiserver"; stop_pid "$DIR/$1.pid" "${2:-TERM}";;
  start) case $1 in etcd) start_etcd;; apiserver) start_apiserver;; *) die "start: etcd or apiserver";; esac;;
  signal) [[ "$1" =~ ^(etcd|apiserver)$ ]] || die "signal: etcd or apiserver"; kill -s "$2" "$(cat "$DIR/$1.pid")";;
  etcd-tls) etcd_tls;;
  down) cmd_down;;
  *) die "unknown command $cmd";;
esac
