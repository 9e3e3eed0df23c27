#!/usr/bin/env bash
# Builds native/build/liblorahub_native.so against $LIBTORCH (a PyTorch torch folder) or the system libtorch.
# Incremental: re-running only recompiles what changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="${LH_NATIVE_BUILD_DIR:-$here/build}"
cmake -S "$here" -B "$build" -DLIBTORCH="${LIBTORCH:-}" >/dev/null
cmake --build "$build" -j"$(nproc)"
echo "native: $build/liblorahub_native.so"
