#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, the fused q/k/v block's frozen
# bases as ONE GEMM each way (src/TorchExtensions/FusedOps/StackedBases.cs: x·[Wq;Wk;Wv]ᵀ forward, [dq|dk|dv]·[Wq;Wk;Wv]
# backward, the weights re-homed into one storage on the first fused call; the rope kernel's backward writes dq, dk, dv
# as column blocks of one buffer). Switch: LORAHUB_QKV_STACKED_BASE (default off; 1 on). Under ~72 s:
#   1. Tests on CUDA: StackedBasesTests (re-homing: one storage, same values and saved bytes, no second copy (exact with
#      cudaMallocAsync stats), staged through host memory or not; stacked vs three GEMMs: outputs and gradients of x, A,
#      B, forward stacked or not, with DoRA-like row scales too; the rope kernel's gradients as adjacent column blocks).
#      Log: $OUT/H2/tests.log.
#   2. llama-1b LoRA r16 4x2048, 8 timed steps: the switch on (re-homed weights, backward's dx one GEMM; forward three
#      GEMMs: LORAHUB_QKV_STACKED_FORWARD defaults off) and off, then on with the stacked forward (its memory: call A
#      showed peak_gib +0.47 GiB with it). Expected: ~0.56 ms a step less on (dx 189 -> 154 us per layer, microbench).
set -uo pipefail
source scripts/gpu/env.sh
out="$(realpath -m "${OUT:-/tmp/lorahub-out}")/H2"; mkdir -p "$out"
log="$out/bench.jsonl"; : > "$log"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
start=$SECONDS

run_bench() { # METHOD ON [ENV=...]
  echo "== $1 stacked=$2 ${3:-}" >> "$log"
  env LORAHUB_QKV_STACKED_BASE=$2 ${3:-} timeout 40 "${bench[@]}" train llama-1b "$1" 4 2048 0 8 cuda:0 2>&1 | grep -E '^\{|rror' | tail -3 >> "$log"
}

# Call B (75 s hard): the tests of what changed first (<= ~20 s), then the on/off pair, then the stacked forward for its memory.
TIMEOUT=20 xunit_cuda LoRAHub.TorchExtensions.Tests StackedBasesTests > "$out/tests.log" 2>&1
grep -E "did not compile" -A20 "$out/tests.log" | head -30
grep -E "Total:|\[FAIL\]" -A8 "$out/tests.log" | head -40
echo "tests: $((SECONDS - start)) s"
run_bench lora 1
run_bench lora 0
if (( SECONDS - start < 50 )); then run_bench lora 1 LORAHUB_QKV_STACKED_FORWARD=1; else echo "skipped: lora stacked forward (time)"; fi
echo "bench: $((SECONDS - start)) s"
python3 scripts/gpu/bench_summary.py "$log" stacked=stacked_qkv_bases paths=paths
echo "total: $((SECONDS - start)) s"
