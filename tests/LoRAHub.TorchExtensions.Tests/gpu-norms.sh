#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, RMSNorm's row-in-registers kernels
# (src/TorchExtensions/FusedOps/RmsNormKernels.cs) and the residual add fused into post_attention_layernorm
# (torchx.nn.functional.add_rms_norm, AddRmsNormFunction, LlamaDecoderLayer). About 60-90 s (call A: 39 s):
#   1. Tests on CUDA: RmsNormRowsKernelTests (row kernels and add_rms_norm vs the composite ops and fused.cu's block-per-row
#      kernels, fp32/fp16/bf16, every packs/warps shape, dw partials, fallbacks), FusedKernelTests (the older RMSNorm tests,
#      now through the row kernels), AddRmsNormDecoderTests (Llama logits/gradients with and without the fused add, packed,
#      checkpointed; Gemma unchanged), RopeGqaKernelTests. NVRTC errors show as "did not compile". Log: $OUT/norms/tests.log.
#   2. Nsight Compute on the llama-1b-shape test (8192 x 2048 bf16): lh_rms_norm_* (block per row, the session-7
#      baseline; call A: fwd 29.0 us, bwd 34.9), lh_rms_rows_* (row kernels; fwd with and without the residual share a
#      name: the residual one is the slower half; bwd _00 plain, _01 with the residual's gradient), at::elementwise add;
#      then each launch shape once (block (32, R): R rows per block; grid 528/1056/264: 4/8/2 blocks per SM looping over
#      rows), with registers, achieved occupancy and DRAM %. Then the same with LORAHUB_RMSNORM_ROWS_CG=0 (rows through
#      L1) and LORAHUB_RMSNORM_ROWS_ASM=0 (plain loads) as time allows. Tables: $OUT/norms/ncu-*.txt.
#   3. llama-1b LoRA r16 4x2048, 12 steps: default (row kernels + add_rms_norm) vs LORAHUB_RMSNORM_ROWS_KERNEL=0
#      LORAHUB_ADD_RMSNORM=0 (the session-7 start) vs LORAHUB_ADD_RMSNORM=0 (row kernels only) vs
#      LORAHUB_RMSNORM_ROWS_BLOCKS_PER_SM=4 (looping grids, fwd and bwd prefetching the next row): $OUT/norms/bench.jsonl.
#   4. Time left: one bench step under ncu, only lh_rms* and elementwise adds (count and mean per kernel): $OUT/norms/step.txt.
set -uo pipefail
source scripts/gpu/env.sh
out="$(realpath -m "${OUT:-/tmp/lorahub-out}")/norms"; mkdir -p "$out"
start=$SECONDS
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)

{ TIMEOUT=100 xunit_cuda LoRAHub.TorchExtensions.Tests RmsNormRowsKernelTests FusedKernelTests RopeGqaKernelTests
  TIMEOUT=60 xunit_cuda LoRAHub.Models.Tests AddRmsNormDecoderTests; } > "$out/tests.log" 2>&1
grep -iE "did not compile" -A30 "$out/tests.log" | head -40
grep -E "Total:|\[FAIL\]" -A8 "$out/tests.log" | head -60
echo "tests: $((SECONDS - start)) s"

METRICS=gpu__time_duration.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed
summary() { # csv -> table: kernel, grid, block, n, mean/min us, registers, achieved occupancy %, DRAM %
python3 - "$1" <<'PY'
import csv, sys
from collections import defaultdict
UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
lines = [l for l in open(sys.argv[1], newline="") if l.startswith('"')]
groups = defaultdict(lambda: defaultdict(list))
for r in csv.DictReader(lines):
    name = r["Kernel Name"].split("(")[0]
    if "elementwise" in name: name = "at::" + ("AddFunctor" if "Add" in r["Kernel Name"] else "elementwise other")
    v = float(r["Metric Value"].replace(",", ""))
    if r["Metric Name"] == "gpu__time_duration.sum": v *= UNIT.get(r["Metric Unit"], 1.0)
    groups[(name[:44], r.get("Grid Size", ""), r.get("Block Size", ""))][r["Metric Name"]].append(v)
print(f'{"kernel":44} {"grid":>14} {"block":>12} {"n":>3} {"mean us":>8} {"min us":>7} {"regs":>5} {"occ%":>5} {"dram%":>5}')
for (name, grid, block), m in sorted(groups.items()):
    us = m["gpu__time_duration.sum"] or [0]
    avg = lambda k: sum(m[k]) / max(1, len(m[k]))
    print(f"{name:44} {grid:>14} {block:>12} {len(us):3d} {sum(us) / len(us):8.1f} {min(us):7.1f} "
          f"{avg('launch__registers_per_thread'):5.0f} {avg('sm__warps_active.avg.pct_of_peak_sustained_active'):5.0f} "
          f"{avg('dram__throughput.avg.pct_of_peak_sustained_elapsed'):5.0f}")
PY
}

ncu_test() { # tag kernel-regex test-method [env...]
  local tag=$1 regex=$2 method=$3; shift 3
  (cd .publish/tests && env "$@" LORAHUB_TEST_DEVICE=cuda timeout 60 ncu --clock-control none --metrics $METRICS --csv \
    --kernel-name regex:"$regex" --log-file "$out/ncu-$tag.csv" dotnet exec --roll-forward Major \
    --depsfile LoRAHub.TorchExtensions.Tests.deps.json --runtimeconfig LoRAHub.TorchExtensions.Tests.runtimeconfig.json \
    ../xunit-runner/xunit.console.dll LoRAHub.TorchExtensions.Tests.dll \
    -method "LoRAHub.TorchExtensions.Tests.$method" -nocolor 2>&1 \
    | grep -v '^==PROF==' | grep -E "Total:|FAIL|rror" | head -8)
  summary "$out/ncu-$tag.csv" > "$out/ncu-$tag.txt" 2>&1
  echo "== ncu $tag"; cat "$out/ncu-$tag.txt"
}
norms=RmsNormRowsKernelTests.Llama_1b_shapes_agree_across_kernels
ncu_test norms "lh_rms|elementwise" $norms
echo "ncu: $((SECONDS - start)) s"

log="$out/bench.jsonl"; : > "$log"
run_bench() { # label env...
  local label=$1; shift
  echo "== $label" >> "$log"
  env "$@" timeout 60 "${bench[@]}" train llama-1b lora 4 2048 0 12 cuda:0 2>&1 | grep -E '^\{|LoRAHub:|rror' | tail -3 >> "$log"
}
run_bench "default (row kernels, add_rms_norm)" LORAHUB_ADD_RMSNORM=1
run_bench "LORAHUB_RMSNORM_ROWS_KERNEL=0 LORAHUB_ADD_RMSNORM=0" LORAHUB_RMSNORM_ROWS_KERNEL=0 LORAHUB_ADD_RMSNORM=0
run_bench "LORAHUB_ADD_RMSNORM=0 (row kernels only)" LORAHUB_ADD_RMSNORM=0
run_bench "LORAHUB_RMSNORM_ROWS_BLOCKS_PER_SM=4 (looping grids, next row prefetched)" LORAHUB_RMSNORM_ROWS_BLOCKS_PER_SM=4
python3 - "$log" <<'EOF'
import json, sys
label = ""
for line in open(sys.argv[1]):
    if line.startswith("== "): label = line[3:].strip(); continue
    if not line.startswith("{"): print(label, line.strip()[:300]); continue
    d = json.loads(line)
    print(f'{label}: tokens_per_s {d.get("tokens_per_s")}, step {d.get("step_ms")} ms, peak {d.get("peak_gib")} GiB, loss {d.get("loss")}')
EOF
echo "bench: $((SECONDS - start)) s"

(( SECONDS - start < 100 )) && ncu_test norms-cg0 "lh_rms_rows" $norms LORAHUB_RMSNORM_ROWS_CG=0
(( SECONDS - start < 110 )) && ncu_test norms-asm0 "lh_rms_rows" $norms LORAHUB_RMSNORM_ROWS_ASM=0

if (( SECONDS - start < 120 )); then
  LORAHUB_BENCH_PROFILE_STEP=1 timeout 45 ncu --profile-from-start off --clock-control none --metrics $METRICS --csv \
    --kernel-name regex:"lh_rms|elementwise" --log-file "$out/step.csv" "${bench[@]}" train llama-1b lora 4 2048 0 3 cuda:0 > /dev/null 2>&1
  summary "$out/step.csv" > "$out/step.txt" 2>&1
  echo "== one step (ncu)"; cat "$out/step.txt"
fi
echo "total: $((SECONDS - start)) s"
