#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): DoRA's row-scale kernels
# (FusedOps/LoraRowScaleKernels.cs; issue 19: DoRA >= 0.95x our LoRA's tok/s). About 60-90 s:
#   1. Tests on CUDA: LoraRowScaleKernelTests (the new row-scale forward bit for bit against mul_/add_, the scaled SwiGLU
#      and row-scale backward bit for bit against the SwiGLU kernels / tensor ops, every rows-in-flight and grid choice),
#      LoraFusionTests, and the fused DoRA / LoRA block tests. Log: $OUT/rowscale/tests.log.
#   2. Nsight Compute: each kernel's duration in the llama-1b-shape test (SwiGLU 8192 x 8192 bf16, q/down 8192 x 2048,
#      k/v 8192 x 512; every rows-in-flight R and forward grid, with the composite ops beside them: lh_swiglu_*,
#      at::elementwise_kernel = mul_). Table: $OUT/rowscale/ncu.txt, one line per kernel and grid.
#   3. With time left: the DoRA bench, llama-1b r16 4x2048 (tokens_per_s; session 6 call 1: 69,185, LoRA 78,608).
set -uo pipefail
source scripts/gpu/env.sh
out="$(realpath -m "${OUT:-/tmp/lorahub-out}")/rowscale"; mkdir -p "$out"
start=$SECONDS
suite_cmd() { echo dotnet exec --roll-forward Major --depsfile "$1.deps.json" --runtimeconfig "$1.runtimeconfig.json" ../xunit-runner/xunit.console.dll "$1.dll"; }
tests() { # suite [xunit filter args]
  (cd .publish/tests && LORAHUB_TEST_DEVICE=cuda timeout 150 $(suite_cmd "$1") "${@:2}" -nocolor 2>&1)
}
{ tests LoRAHub.TorchExtensions.Tests -class LoRAHub.TorchExtensions.Tests.LoraRowScaleKernelTests \
    -class LoRAHub.TorchExtensions.Tests.LoraFusionTests
  tests LoRAHub.DoRA.Tests -class LoRAHub.DoRA.Tests.DoraFusedTests -class LoRAHub.DoRA.Tests.FusedDoraBlockTests
  tests LoRAHub.LoRA.Tests -class LoRAHub.LoRA.Tests.FusedLoraBlockTests; } > "$out/tests.log"
grep -E "Total:|\[FAIL\]" -A6 "$out/tests.log" | head -60
grep -iE "did not compile|tensor ops run instead" "$out/tests.log" | head -3
echo "tests: $((SECONDS - start)) s"

# Kernel durations (clocks left alone, as scripts/gpu/profile-step.sh); only the kernels of interest are profiled.
(cd .publish/tests && LORAHUB_TEST_DEVICE=cuda timeout 180 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  --kernel-name regex:"lh_lora|lh_swiglu|elementwise_kernel" --log-file "$out/ncu.csv" $(suite_cmd LoRAHub.TorchExtensions.Tests) \
  -method LoRAHub.TorchExtensions.Tests.LoraRowScaleKernelTests.Llama_1b_shapes_have_the_composite_bits_for_every_launch_shape \
  -nocolor 2>&1 | grep -v '^==PROF==' | grep -E "Total:|FAIL|rror" | head -8)
python3 - "$out/ncu.csv" > "$out/ncu.txt" <<'PY'
import csv, sys
from collections import defaultdict
UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
lines = [l for l in open(sys.argv[1], newline="") if l.startswith('"')]
groups = defaultdict(list)
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum": continue
    name = r["Kernel Name"].split("(")[0]
    if "elementwise_kernel" in name: name = "at::elementwise_kernel " + ("MulFunctor" if "MulFunctor" in r["Kernel Name"] else "copy/other")
    groups[(name[:70], r["Grid Size"])].append(float(r["Metric Value"].replace(",", "")) * UNIT.get(r["Metric Unit"], 1.0))
print(f'{"kernel":70} {"grid":>14} {"n":>3} {"mean us":>9} {"min us":>9}')
for (name, grid), us in sorted(groups.items()):
    print(f"{name:70} {grid:>14} {len(us):3d} {sum(us) / len(us):9.1f} {min(us):9.1f}")
PY
cat "$out/ncu.txt"
echo "ncu: $((SECONDS - start)) s"

if (( SECONDS - start < 70 )); then
  timeout 90 dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b dora 4 2048 0 12 cuda:0 2>&1 | grep -v '^   at ' | tail -2 | tee "$out/bench-dora.jsonl"
fi
echo "total: $((SECONDS - start)) s"
