#!/usr/bin/env bash
# Fuzzes every parser of input strangers write (peer annotations, etcd keys and
# values, net-conf.json, subnet.env, the policy model's object conversion) with
# cargo fuzz (libFuzzer), each for SECONDS (default 60), and prints how many
# executions each ran. A crash is left in fuzz/artifacts/<target>/; keep it as a
# regression test next to the parser's unit tests.
# usage: bash scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}; shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(peer_annotations etcd_lease net_conf subnet_env policy_objects)
# cargo fuzz asks the compiler for coverage instrumentation flags that the
# stable toolchain accepts only with RUSTC_BOOTSTRAP; no sanitizer (-s none).
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none -O
rc=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if timeout $((secs + 600)) cargo fuzz run -s none -O "$t" "corpus/$t" -- \
      -max_total_time="$secs" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
    res=ok
  elif ls "artifacts/$t"/crash-* >/dev/null 2>&1; then
    res=CRASH; rc=1
  else
    res=FAILED; rc=1
  fi
  execs=$(grep -a -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  echo "fuzz $t: $res, $execs executions in ${secs}s"
  [ $res = ok ] || tail -n 30 "$log"
  rm -f "$log"
done
exit $rc
