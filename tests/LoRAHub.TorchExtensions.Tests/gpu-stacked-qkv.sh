#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, the fused q/k/v block's frozen
# bases as ONE GEMM each way (src/TorchExtensions/FusedOps/StackedBases.cs: x·[Wq;Wk;Wv]ᵀ forward, [dq|dk|dv]·[Wq;Wk;Wv]
# backward, the weights re-homed into one storage on the first fused call; the rope kernel's backward writes dq, dk, dv
# as column blocks of one buffer). Switch: LORAHUB_QKV_STACKED_BASE (default on; 0 off). Under ~95 s, stages skip
# themselves when time runs out:
#   1. llama-1b r16 4x2048, 8 timed steps: LoRA with the switch on and off, then DoRA on and off where time allows
#      ($OUT/H2/bench.jsonl). Expected (session 7 GEMM microbench): ~0.7 ms a step less with it on (forward 145 -> 136
#      us, dx 189 -> 154 us per layer); DoRA also one row-scale pass each way instead of three where H1's rope epilogue
#      does not take the scales. peak_gib on vs off: what re-homing and the stacked buffers cost in memory (none meant).
#   2. Tests on CUDA with the time left: StackedBasesTests (re-homing: one storage, same values and saved bytes, no
#      second copy (exact with cudaMallocAsync stats); stacked vs three GEMMs: outputs and gradients of x, A, B, with
#      DoRA-like row scales too; the rope kernel's gradients as adjacent column blocks), RopeGqaKernelTests (the rope kernel vs the composite ops, now with the token stride of its
#      backward's output), LoRA's StackedQkvBasesTests (Llama: loss, gradients, saved state, merge).
#      Log: $OUT/H2/tests.log.
set -uo pipefail
source scripts/gpu/env.sh
out="$(realpath -m "${OUT:-/tmp/lorahub-out}")/H2"; mkdir -p "$out"
log="$out/bench.jsonl"; : > "$log"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
start=$SECONDS

run_bench() { # METHOD ON
  echo "== $1 stacked=$2" >> "$log"
  LORAHUB_QKV_STACKED_BASE=$2 timeout 30 "${bench[@]}" train llama-1b "$1" 4 2048 0 8 cuda:0 2>&1 | grep -E '^\{|rror' | tail -3 >> "$log"
}

# Bench first (~20 s a run; a pair only where it ends by ~95 s), then the tests with the time left.
run_bench lora 1
run_bench lora 0
if (( SECONDS - start < 52 )); then run_bench dora 1; run_bench dora 0; else echo "skipped: dora (time)"; fi
echo "bench: $((SECONDS - start)) s"

left=$(( 97 - (SECONDS - start) ))
if (( left >= 12 )); then
  TIMEOUT=$left xunit_cuda LoRAHub.TorchExtensions.Tests StackedBasesTests RopeGqaKernelTests > "$out/tests.log" 2>&1
  left=$(( 97 - (SECONDS - start) ))
  (( left >= 10 )) && TIMEOUT=$left xunit_cuda LoRAHub.LoRA.Tests StackedQkvBasesTests >> "$out/tests.log" 2>&1
  grep -E "did not compile" -A20 "$out/tests.log" | head -30
  grep -E "Total:|\[FAIL\]" -A8 "$out/tests.log" | head -50
else echo "tests skipped (time)"; fi
echo "tests: $((SECONDS - start)) s"
python3 - "$log" <<'PY'
import json, sys
label = ""
for line in open(sys.argv[1]):
    if line.startswith("== "): label = line[3:].strip(); continue
    if not line.startswith("{"): print(label, line.strip()[:300]); continue
    d = json.loads(line)
    print(f'{label}: tokens_per_s {d.get("tokens_per_s")}, step {d.get("step_ms")} ms, peak {d.get("peak_gib")} GiB, loss {d.get("loss")} | stacked: {d.get("stacked_qkv_bases")} | {d.get("paths")}')
PY
echo "total: $((SECONDS - start)) s"
