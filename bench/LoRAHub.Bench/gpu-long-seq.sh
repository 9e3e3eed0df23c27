#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19's longest trainable sequence with
# the MLP run in token chunks (ChunkedMlp, docs/checkpointing.md). About 230 s as it stands (the final call's variant
# below ~180 s), every step under its own timeout:
#   1. ChunkedMlpTests on CUDA (fp32 composite and fused LoRA paths, dropout, checkpointed model; bf16 within rounding). ~5 s
#   2. llama-7b LoRA r16 2×2048 with checkpointing (policy all), MLP chunking off (LORAHUB_MLP_CHUNK=0; the automatic
#      default is off at 4,096 tokens, ChunkedMlpTests checks the rule) and forced into 2,048-token chunks (what chunking
#      costs where it is not needed): tokens/s, default allocator. ~20 s (SPEED=0 skips; SPEED_MODES="0 auto 2048")
#   3. The longest batch-1 llama-7b QLoRA r16 sequence (our NF4, double quant; every layer checkpointed and offloaded)
#      whose step peaks within 24 GiB, under cudaMallocAsync: probes 32768 and 65536, then a little short of the sequence
#      their peaks' line predicts (multiples of 4096, up to LONGEST_MAX=196608), lowered to what LONGEST_S seconds of
#      probes allow (default 135; the QLoRA build, ~45 s, comes on top), then 4096 further while the time lasts (one
#      more probe at ~140k takes ~65 s). LORAHUB_MLP_CHUNK=on so that the short probes chunk as the long ones do (the
#      automatic choice chunks from 48,771 tokens on, in the same chunks), or their line would be that of whole MLPs.
#      PROBES=139264,143360: these first, whatever the time (~60 + 65 s), then the search goes on while LONGEST_S lasts.
#      The final call: SPEED=0 PROBES=139264,143360 LONGEST_S=130 (~180 s).
#      AB=chunk repeats the second probe with the MLP whole (what chunking saves and costs at a long sequence), AB=sdpa
#      with cuDNN attention off (which backend's backward holds less), AB=chunk,sdpa both; each counts in LONGEST_S.
#      CUDNN_SDPA=0 searches without cuDNN attention.
# Output: $OUT/long-seq.jsonl (one JSON line per run or probe), $OUT/chunked-mlp-tests.log.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
log="$out/long-seq.jsonl"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
# Line by line (no tail): a run cut short by an outer time limit still leaves its finished probes in the log.
run() { timeout "$1" "${bench[@]}" "${@:2}" 2>&1 | grep --line-buffered -v '^   at ' | tee -a "$log"; }
start=$SECONDS
TIMEOUT=60 xunit_cuda LoRAHub.Models.Tests ChunkedMlpTests > "$out/chunked-mlp-tests.log"
grep -E "Total:|\[FAIL\]" -A4 "$out/chunked-mlp-tests.log" | head -30
echo "tests: $((SECONDS - start)) s"
if [[ "${SPEED:-1}" != 0 ]]; then
  for mode in ${SPEED_MODES:-0 2048}; do
    echo "{\"mlp_chunk_env\":\"$mode\"}" | tee -a "$log"
    LORAHUB_MLP_CHUNK=$mode run 45 ckpt llama-7b lora 2 2048 all 5 cuda:0
  done
  echo "speed runs: $((SECONDS - start)) s"
fi
longest=${LONGEST_S:-135}
PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync LORAHUB_MLP_CHUNK=on LORAHUB_LONGEST_AB=${AB:-} LORAHUB_LONGEST_PROBES=${PROBES:-} \
  LORAHUB_BENCH_CUDNN_SDPA=${CUDNN_SDPA:-1} run $((longest + 100)) longest-seq llama-7b qlora offload 24 32768 "${LONGEST_MAX:-196608}" "$longest" cuda:0
echo "total: $((SECONDS - start)) s"
