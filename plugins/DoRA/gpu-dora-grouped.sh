#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): DoRA's extra time per step (issue 19, DoRA
# >= 0.95x our LoRA): one grouped launch for a step's 112 norms and row scales (LoraWeightNorms.grouped_low_rank_row_norms,
# prepared once and run each step by DoraNormGroup; pipelined block code), m's gradient divided in the launch that sums
# it, and (opt-in, LORAHUB_LORA_ROWSCALE_FUSED_REDUCE=1: slower in session 7's final call) the row-scale backward's column
# reduce inside its kernel. About 50-60 s; files in $OUT/dora-grouped/:
#   1. tests.log: the DoRA norm/cache/fused tests on CUDA (GroupedNormTests: grouped vs fp64 definition and the
#      per-projection kernel, c = m.div(norm) bit for bit, pipelined = plain bits, refusals, a Llama's steps: one grouped
#      launch of 14 items per step, the prepared launch rebuilt when a member changes, the per-projection losses) and
#      TorchExtensions' row-scale tests (LoraRowScaleDivisorTests: divided gradients = autograd's division, fused column
#      reduce = lh_lora_col_reduce, bit for bit).
#   2. grouped-bench.txt: one llama-1b step's norms, 112 per-projection launches vs one grouped launch, plain vs pipelined
#      block code (us per step, host us).
#   3. host-bench.txt: host milliseconds per step of a 16-layer Llama with tiny widths (the GPU work is negligible: the
#      host's own time) trained by LoRA and by DoRA, and (DoRA − LoRA)/112 per projection, with the fused column reduce
#      on (LORAHUB_LORA_ROWSCALE_FUSED_REDUCE=1) and off (the default).
# The step-level comparison (llama-1b 4x2048: DoRA default vs LORAHUB_LORA_ROWSCALE_FUSED_REDUCE=0 vs
# LORAHUB_DORA_NORM_GROUPED=0) is the lead's headline run.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}/dora-grouped"; mkdir -p "$out"
start=$SECONDS

export LORAHUB_DORA_GROUPED_BENCH="$out/grouped-bench.txt"
: > "$LORAHUB_DORA_GROUPED_BENCH"
{ TIMEOUT=100 xunit_cuda LoRAHub.DoRA.Tests GroupedNormTests NormKernelTests NormCacheTests DoraFusedTests FusedDoraBlockTests
  TIMEOUT=40 xunit_cuda LoRAHub.TorchExtensions.Tests LoraRowScaleDivisorTests LoraRowScaleKernelTests; } > "$out/tests.log"
unset LORAHUB_DORA_GROUPED_BENCH
grep -E "Total:|\[FAIL\]" -A6 "$out/tests.log" | head -40
grep -i "did not compile" "$out/tests.log" | head -3
cat "$out/grouped-bench.txt"
echo "tests: $((SECONDS - start)) s"

: > "$out/host-bench.txt"
for reduce in 1 0; do
  ( export LORAHUB_DORA_HOST_BENCH="$out/host-bench.txt" LORAHUB_LORA_ROWSCALE_FUSED_REDUCE=$reduce
    TIMEOUT=40 xunit_cuda LoRAHub.DoRA.Tests DoraHostTimeTests ) > "$out/host-bench-$reduce.log"
  grep -E "\[FAIL\]" "$out/host-bench-$reduce.log" | head -3
  echo "(fused column reduce $reduce)" >> "$out/host-bench.txt"
done
cat "$out/host-bench.txt"
echo "total: $((SECONDS - start)) s"
