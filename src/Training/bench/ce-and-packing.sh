#!/usr/bin/env bash
# There (the GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19 items 2 and 4.
# (a) llama-1b LoRA r16 4×2048: the fused linear cross-entropy (default) against the recompute variant
#     (LORAHUB_CE=recompute), speed with the default allocator, then peak memory under cudaMallocAsync (see bench/README.md).
# (b) padded against packed batches on examples of lengths uniform in [64, 2048], batches of 4 and 8: real tokens/s
#     (modes padded, packed-mask and packed: see packing_bench.csx), LoRA r16 on llama-1b, 16 timed steps after 3.
# JSON lines to $OUT/ce-bench.jsonl and $OUT/packing-bench.jsonl. About 3 minutes on one H200 (each step under its own
# timeout: 4 × 300 s and 400 s at most).
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
ce="$out/ce-bench.jsonl"
for memory in "" 1; do
  for variant in fused recompute; do
    echo "== cross-entropy: $variant${memory:+ (memory)}"
    env ${memory:+PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync} $([[ $variant == recompute ]] && echo LORAHUB_CE=recompute) \
      timeout 300 dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b lora 4 2048 0 8 cuda:0 2>&1 | grep -v '^   at ' | tail -2 \
      | sed "s/^{/{\"ce\": \"$variant\", \"memory_run\": \"${memory:-0}\", /" | tee -a "$ce"
  done
done
echo "== packing: padded vs packed, lengths 64..2048"
export LORAHUB_SCRIPT_CACHE=/tmp/lorahub-script-cache
timeout 400 dotnet .publish/host/loraHub.dll run --device cuda:0 src/Training/bench/packing_bench.csx llama-1b 64 2048 16 4,8 2>&1 \
  | tee "$out/packing-bench.log" | grep -E '^\{|packing' | tee -a "$out/packing-bench.jsonl"
