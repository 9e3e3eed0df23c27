#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, the LoRA MLP's low-rank updates
# formed inside the SwiGLU kernels on tensor cores (src/TorchExtensions/FusedOps/LoraMlpKernels.cs). About 60 s:
#   1. Their tests on CUDA: LoraMlpMmaKernelTests (fused MLP vs the composite ops: output and the gradients of x, A's, B's;
#      bf16/fp16, ranks 0..64, odd token counts, partial column strips; the kernels vs an fp64 reference; the switch),
#      LoraFusionTests, FusedLoraBlockTests (Llama with LoRA on all projections). An NVRTC compile failure of the kernels
#      shows as "did not compile" with NVRTC's log.
#   2. llama-1b LoRA r16 4x2048, 12 timed steps: LORAHUB_LORA_MLP_KERNEL=0 (the addmm passes) vs 1 (default): tokens_per_s.
#   3. Nsight Compute on one step with the kernels on, only lh_lora_mlp_mma_* profiled (duration, DRAM throughput,
#      registers, achieved occupancy), per tuning variant VARIANTS="MT:ROWS ..." (LORAHUB_LORA_MLP_KERNEL_MT = tiles in
#      flight "fwd,bwd", LORAHUB_LORA_MLP_KERNEL_ROWS = tokens per block "fwd,bwd"; default: the defaults 1,1:128,64).
#      Mid call of session 6 (H200): forward 152 us (1 tile/step, 128 tokens/block; 175 with 2), backward 319 us (1 tile,
#      64 tokens/block; 333 with 128, 395 with 2 tiles). They replace (per layer at 8192x8192 bf16): forward 2 addmm
#      ~80 us each + lh_swiglu_fwd 116 us = ~276 us; backward addmm 99 us + recompute lh_swiglu_fwd 116 us +
#      lh_swiglu_bwd 184 us = ~399 us.
# Output: $OUT/mlp-mma-tests.log, $OUT/mlp-mma.jsonl, $OUT/ncu-mma-*.csv.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
log="$out/mlp-mma.jsonl"; : > "$log"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
start=$SECONDS

tests() { # suite, classes...
  local suite=$1; shift
  local args=(); for c in "$@"; do args+=(-class "$suite.$c"); done
  (cd .publish/tests && LORAHUB_TEST_DEVICE=cuda timeout 120 dotnet exec --roll-forward Major --depsfile "$suite.deps.json" \
    --runtimeconfig "$suite.runtimeconfig.json" ../xunit-runner/xunit.console.dll "$suite.dll" "${args[@]}" -nocolor 2>&1)
}
{ tests LoRAHub.TorchExtensions.Tests LoraMlpMmaKernelTests LoraFusionTests
  tests LoRAHub.LoRA.Tests FusedLoraBlockTests; } > "$out/mlp-mma-tests.log" 2>&1
grep -E "did not compile" -A30 "$out/mlp-mma-tests.log" | head -40
grep -E "Total:|\[FAIL\]" -A8 "$out/mlp-mma-tests.log" | head -60
echo "tests: $((SECONDS - start)) s"

for k in 0 1; do
  echo "== kernel=$k" >> "$log"
  LORAHUB_LORA_MLP_KERNEL=$k timeout 60 "${bench[@]}" train llama-1b lora 4 2048 0 12 cuda:0 2>&1 \
    | grep -E '^\{|LoRAHub:|rror' | tail -3 >> "$log"
done
python3 - "$log" <<'EOF'
import json, sys
label = ""
for line in open(sys.argv[1]):
    if line.startswith("== "): label = line[3:].strip(); continue
    if not line.startswith("{"): print(label, line.strip()[:300]); continue
    d = json.loads(line)
    print(f'{label}: tokens_per_s {d.get("tokens_per_s")}, step {d.get("step_ms")} ms, peak {d.get("peak_gib")} GiB, loss {d.get("loss")} | {d.get("paths")}')
EOF
echo "bench: $((SECONDS - start)) s"

for v in ${VARIANTS:-1,1:128,64}; do
  mt=${v%%:*}; rows=${v##*:}; tag="mt${mt/,/-}-rows${rows/,/-}"
  LORAHUB_BENCH_PROFILE_STEP=1 LORAHUB_LORA_MLP_KERNEL_MT=$mt LORAHUB_LORA_MLP_KERNEL_ROWS=$rows timeout 60 \
    ncu --profile-from-start off --clock-control none --kernel-name regex:lh_lora_mlp_mma \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
    --csv --log-file "$out/ncu-mma-$tag.csv" "${bench[@]}" train llama-1b lora 4 2048 0 3 cuda:0 > /dev/null 2>&1
  python3 - "$out/ncu-mma-$tag.csv" "$tag" <<'EOF'
import csv, re, sys
from collections import defaultdict
UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
lines = [l for l in open(sys.argv[1], newline="") if l.startswith('"')]
k = defaultdict(lambda: defaultdict(list))
for r in csv.DictReader(lines):
    name = re.sub(r"\(.*", "", r["Kernel Name"])
    v = float(r["Metric Value"].replace(",", ""))
    if r["Metric Name"] == "gpu__time_duration.sum": v *= UNIT.get(r["Metric Unit"], 1.0)
    k[name + " grid=" + r.get("Grid Size", "")][r["Metric Name"]].append(v)
if not k: print(sys.argv[2], ": no lh_lora_mlp_mma kernel profiled (did the kernels run?)")
for name, m in sorted(k.items()):
    avg = lambda key: sum(m[key]) / max(1, len(m[key]))
    print(f'{sys.argv[2]}: {name}: n={len(m["gpu__time_duration.sum"])} {avg("gpu__time_duration.sum"):.1f} us, '
          f'DRAM {avg("dram__throughput.avg.pct_of_peak_sustained_elapsed"):.0f}%, regs {avg("launch__registers_per_thread"):.0f}, '
          f'warps active {avg("sm__warps_active.avg.pct_of_peak_sustained_active"):.0f}%')
EOF
done
echo "total: $((SECONDS - start)) s"
