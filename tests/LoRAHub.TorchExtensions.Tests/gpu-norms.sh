#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, RMSNorm kernels and the residual
# add fused into the norms (torchx.nn.functional.add_rms_norm, AddRmsNormFunction, FusedOps/RmsNormKernels.cs,
# LlamaDecoderLayer). About 35 s (BENCH=1: +25 s):
#   1. Tests on CUDA: RmsNormRowsKernelTests (the row kernels, lh_rms_block_fwd_res and add_rms_norm vs the composite ops
#      and fused.cu's kernels, fp32/fp16/bf16, every packs/warps shape, dw partials, fallbacks), FusedKernelTests,
#      AddRmsNormDecoderTests (Llama logits/gradients with and without the fused adds, packed, checkpointed; Gemma
#      unchanged), RopeGqaKernelTests. NVRTC errors show as "did not compile". Log: $OUT/norms/tests.log.
#   2. Nsight Compute on the llama-1b-shape test (8192 x 2048 bf16): lh_rms_norm_* (fused.cu; call B: fwd 29.1 us, bwd
#      35.3), lh_rms_block_fwd_res (add_rms_norm's forward), lh_rms_rows_bwd_* (_00 plain, _01 with the residual's
#      gradient; call B: 31.2 and 44.7 us), bwdp (looping grid), the row forward (ForwardRows, off by default: 33 us),
#      at::elementwise add (20.7 us), with registers, achieved occupancy and DRAM %. Table: $OUT/norms/ncu-norms.txt.
#   3. BENCH=1: llama-1b LoRA default vs LORAHUB_RMSNORM_ROWS_KERNEL=0 LORAHUB_ADD_RMSNORM=0: $OUT/norms/bench.jsonl.
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

# BENCH=1: llama-1b LoRA r16 4x2048, 12 steps, default vs LORAHUB_RMSNORM_ROWS_KERNEL=0 LORAHUB_ADD_RMSNORM=0.
if [[ -n "${BENCH:-}" ]]; then
  log="$out/bench.jsonl"; : > "$log"
  run_bench() { # label env...
    local label=$1; shift
    echo "== $label" >> "$log"
    env "$@" timeout 60 "${bench[@]}" train llama-1b lora 4 2048 0 12 cuda:0 2>&1 | grep -E '^\{|LoRAHub:|rror' | tail -3 >> "$log"
  }
  run_bench "default (add_rms_norm, row backward)" LORAHUB_ADD_RMSNORM=1
  run_bench "LORAHUB_RMSNORM_ROWS_KERNEL=0 LORAHUB_ADD_RMSNORM=0" LORAHUB_RMSNORM_ROWS_KERNEL=0 LORAHUB_ADD_RMSNORM=0
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
fi
echo "total: $((SECONDS - start)) s"
