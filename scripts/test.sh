#!/usr/bin/env bash
# The README's test command (run as root on Debian 12): installs what the tests need,
# then runs every test — unit, CLI, and end-to-end in the namespace lab.
# End-to-end tests are marked ignored ("needs root"); as root they are included.
# Not root: nothing is installed and the summary counts them as ignored, never passed.
set -euo pipefail
cd "$(dirname "$0")/.."
include=()
if [ "$(id -u)" = 0 ]; then
  bash scripts/install-deps.sh
  include=(--include-ignored)
  # buildah remounts / while storing an image layer, which fails where / is not a
  # mount point (a chroot, e.g. ../shared/tools/fresh-machine.sh; never a real machine).
  # There those tests are left out by name, so the summary counts them as filtered out.
  if ! unshare --mount --propagation slave true 2>/dev/null; then
    echo "test.sh: / is not a mount point here (a chroot): leaving out the image tests (image_builds_*)" >&2
    include+=(--skip image_builds_)
  fi
else
  echo "test.sh: not root: installing nothing; the end-to-end tests will be reported as ignored" >&2
fi
cargo build --locked --bins
cargo test --locked --all-targets --no-fail-fast -- --test-threads=2 "${include[@]}"
