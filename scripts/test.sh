#!/usr/bin/env bash
# The README's test command: installs what the tests need (Debian 12, root),
# then runs every test — unit, CLI, and end-to-end in the namespace lab.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
  bash scripts/install-deps.sh
else
  echo "test.sh: not root: installing nothing; lab tests will be skipped (CI runs as root)" >&2
fi
cargo build --locked --bins
cargo test --locked --all-targets --no-fail-fast -- --test-threads=2
