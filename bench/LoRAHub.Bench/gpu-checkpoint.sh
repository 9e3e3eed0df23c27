#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19.3, checkpointing with the layer
# inputs offloaded to pinned host memory. About 4 minutes (3 × ~15 s, QLoRA build ~50 s, probes ≤ LONGEST_S, tests ~20 s);
# every step has its own timeout, 9 minutes at worst:
#   1. llama-7b LoRA r16 2×2048: checkpointing vs checkpointing + offload (and a 4 GiB budget: 6 layers keep their
#      activations, 26 are checkpointed), tokens/s and peak memory, all under
#      PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (peak = the pool's high-water mark, as bench-train.sh MEMORY=1).
#      SPEED=1 adds the same two runs under the default allocator (the README's speed figures; +30 s).
#   2. The longest batch-1 sequence of llama-7b QLoRA r16 (our NF4 kernels; there is no bitsandbytes there) with every
#      layer offloaded whose training step peaks within 24 GiB: 32k, 64k, then a little short of the sequence the two
#      peaks' line predicts (multiples of 4096, up to 196,608), lowered to what LONGEST_S seconds of probes allow
#      (default 120; the QLoRA build and one 2k warm-up step come on top); then 4096 further from a fit or halving back
#      from a miss while the time lasts. The MLP runs in token chunks (LORAHUB_MLP_CHUNK=on, so that the short probes chunk as the long ones;
#      the automatic choice does from 48,771 tokens on). Paged optimizer state (CUDA unified memory) is not in the
#      pool's peak, as in bench-train.sh. bench/LoRAHub.Bench/gpu-long-seq.sh runs this step alone with the chunking
#      tests and speeds.
#      LONGEST_ALL=1 repeats it with checkpointing on the device (policy all), for the gain offload alone brings.
#   3. The checkpoint tests on CUDA under cudaMallocAsync (the device-memory assertion is exact only there).
# Output: $OUT/checkpoint-bench.jsonl (one JSON line per run or probe) and $OUT/checkpoint-tests.log.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
log="$out/checkpoint-bench.jsonl"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
run() { timeout "$1" "${bench[@]}" "${@:2}" 2>&1 | grep -v '^   at ' | tail -14 | tee -a "$log"; }
start=$SECONDS
if [[ -n "${SPEED:-}" ]]; then for p in all offload; do run 60 ckpt llama-7b lora 2 2048 "$p" 8 cuda:0; done; fi
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
for p in all offload budget:4GiB; do run 60 ckpt llama-7b lora 2 2048 "$p" 8 cuda:0; done
echo "ckpt runs: $((SECONDS - start)) s"
longest=${LONGEST_S:-120}
LORAHUB_MLP_CHUNK=on run $((longest + 150)) longest-seq llama-7b qlora offload 24 32768 196608 "$longest" cuda:0
[[ -n "${LONGEST_ALL:-}" ]] && LORAHUB_MLP_CHUNK=on run $((longest + 150)) longest-seq llama-7b qlora all 24 32768 196608 "$longest" cuda:0
echo "with longest-seq: $((SECONDS - start)) s"
TIMEOUT=90 xunit_cuda LoRAHub.TorchExtensions.Tests CheckpointOffloadTests CheckpointPolicyTests AutogradTests > "$out/checkpoint-tests.log"
grep -E "Total:|\[FAIL\]" -A4 "$out/checkpoint-tests.log" | head -30
echo "total: $((SECONDS - start)) s"
