#!/usr/bin/env bash
# There (the GPU machine, from the repo root, after scripts/gpu/prepare.sh here): tokens/s of serve's batched generation
# with several adapters in ONE batch (per-row adapters) against one adapter at a time and the base model alone, through
# the published host on the installed PyTorch's libtorch. JSON lines to $OUT/serve-bench.jsonl.
#   bash src/Server/bench/serve-bench.sh            # the default plan below
#   bash src/Server/bench/serve-bench.sh "llama-1b 8 4 128 128 16 3"
# Arguments per line: shape K M prompt new r repeats (see serve_bench.csx).
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
export LORAHUB_SCRIPT_CACHE=/tmp/lorahub-script-cache
plan=("llama-1b 8 4 128 128 16 3" "llama-1b 16 2 128 128 16 3" "llama-1b 4 16 128 128 16 3")
[[ $# -gt 0 ]] && plan=("$@")
for p in "${plan[@]}"; do
  echo "== serve batching: $p"
  timeout 600 dotnet .publish/host/loraHub.dll run --device cuda:0 src/Server/bench/serve_bench.csx $p 2>&1 | tee -a "$out/serve-bench.log" \
    | grep '^{' | tee -a "$out/serve-bench.jsonl"
done
