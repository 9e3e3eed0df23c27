#!/usr/bin/env bash
# There (GPU machine): llama-7b LoRA r16 2×2048 with checkpointing chosen by an activation-memory budget
# (LORAHUB_BENCH_CKPT_POLICY=budget:SIZE: the layers that fit keep their activations, the rest are checkpointed) —
# speed with the default allocator, then the peak under cudaMallocAsync — for each SIZE in SIZES (default all 6 9 12) and
# for every layer checkpointed ("all" among SIZES). Selective checkpointing at the peer's peak memory is the like-for-like comparison with
# the peer's checkpointed run (25.35 GiB in bench/README.md).
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
plan=${PLAN:-"llama-7b lora 2 2048 1"}
for size in ${SIZES:-all 6 9 12}; do
  policy=$([[ $size == all ]] && echo "" || echo "budget:${size}GiB")
  for mem in 0 1; do
    alloc=$([[ $mem == 1 ]] && echo backend:cudaMallocAsync || echo "")
    PYTORCH_CUDA_ALLOC_CONF=$alloc LORAHUB_BENCH_CKPT_POLICY=$policy dotnet .publish/tests/LoRAHub.Bench.dll train $plan 8 cuda:0 2>&1 \
      | grep '^{' | sed "s/^{/{\"budget\":\"$size\",\"memory_run\":$mem,/" | tee -a "$out/ckpt-budget.jsonl"
  done
done
