#!/usr/bin/env bash
# The demo: a 3-node flannel-rs cluster (kube subnet manager, vxlan) in network
# namespaces, one pod per node, every pod pinging every other, and what each
# node programmed. Everything is torn down on exit or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
LAB=demo
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }
bash scripts/install-deps.sh
cargo build --release --locked --bins
export FLANNELD=$PWD/target/release/flanneld
trap 'bash scripts/lab.sh down $LAB' EXIT
trap 'exit 130' INT TERM
bash scripts/lab.sh down $LAB 2>/dev/null || true
bash scripts/lab.sh up $LAB --nodes 3
for i in 1 2 3; do bash scripts/lab.sh flannel-start $LAB $i --ip-masq >/dev/null; done
declare -A ip
failed=0
for i in 1 2 3; do ip[$i]=$(bash scripts/lab.sh pod-add $LAB $i pod$i); echo "pod$i on node$i: ${ip[$i]}"; done
echo
for a in 1 2 3; do for b in 1 2 3; do
  [ $a = $b ] && continue
  if bash scripts/lab.sh ping $LAB pod$a "${ip[$b]}" 3 0.2 >/dev/null; then r=ok; else r=FAILED; failed=$((failed + 1)); fi
  echo "pod$a (node$a) -> pod$b (node$b) ${ip[$b]}: $r"
done; done
echo
for i in 1 2 3; do bash scripts/lab.sh dump $LAB $i; echo; done
echo "Node annotations (node1):"
bash scripts/lab.sh kubectl $LAB get node node1 -o jsonpath='{.metadata.annotations}{"\n"}'
if [ -t 0 ]; then read -r -p "Press Enter to tear the lab down... " _; fi
[ "$failed" = 0 ] || { echo "demo: $failed pod pairs could not reach each other" >&2; exit 1; }
echo "demo: every pod reached every other pod"
