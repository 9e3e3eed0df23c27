#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): DoRA's host time per step (issue 19: DoRA
# >= 0.95x our LoRA's tok/s). DoRA's norm ‖W0 + s·B·A‖ is one kernel per projection per step now
# (LoraWeightNorms.low_rank_row_norms) instead of ~12 tensor ops. About 90-120 s:
#   1. The DoRA suite on CUDA (NormKernelTests: kernel vs DoraWeightNorm.Direct and fp64 for bf16/fp16/fp32 W0, and the
#      step cache; plus every other DoRA test) and TorchExtensions' LoraFusionTests (row-scale backward), log in
#      $OUT/dora-host-tests.log.
#   2. llama-1b r16 4x2048, no checkpointing, 8 timed steps (+3 warm-up): LoRA, DoRA (kernel), DoRA with
#      LORAHUB_DORA_NORM_KERNEL=0 (the factored ops, as before); then LoRA and DoRA at batch 1, where host_ms is the
#      host's own time (no waiting for the GPU). JSON lines in $OUT/dora-host.jsonl, then the DoRA/LoRA ratios.
#   3. The kernel's own GPU time over one DoRA step (112 launches) under Nsight Compute, when ncu is there.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
log="$out/dora-host.jsonl"; : > "$log"
start=$SECONDS

tests() { # suite [xunit filter args]
  (cd .publish/tests && LORAHUB_TEST_DEVICE=cuda timeout 150 dotnet exec --roll-forward Major --depsfile "$1.deps.json" \
    --runtimeconfig "$1.runtimeconfig.json" ../xunit-runner/xunit.console.dll "$1.dll" "${@:2}" -nocolor 2>&1)
}
# The whole DoRA suite; LoraFusionTests for the row-scale backward, whose column reduce now divides by c itself.
{ tests LoRAHub.DoRA.Tests
  tests LoRAHub.TorchExtensions.Tests -class LoRAHub.TorchExtensions.Tests.LoraFusionTests; } > "$out/dora-host-tests.log"
grep -E "Total:|\[FAIL\]" -A6 "$out/dora-host-tests.log" | head -40
grep -i "did not compile" "$out/dora-host-tests.log" | head -3
echo "tests: $((SECONDS - start)) s"

bench() { timeout 90 dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b "$1" "$2" 2048 0 8 cuda:0 2>&1 | grep -v '^   at ' | tail -2; }
# Batch 4: speed. Batch 1: the host's own time per step (the GPU never makes it wait there).
for run in "lora 1 4" "dora 1 4" "dora 0 4" "lora 1 1" "dora 1 1"; do
  read -r method kernel batch <<< "$run"
  LORAHUB_DORA_NORM_KERNEL=$kernel bench "$method" "$batch" | sed "s/^{/{\"norm_kernel\":$kernel,/" | tee -a "$log"
done
echo "bench: $((SECONDS - start)) s"

python3 - "$log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {(d.get("method"), d.get("norm_kernel")): d for d in rows if d.get("batch") == 4}
for d in rows:
    print(f'{d.get("method")} batch {d.get("batch")} norm_kernel={d.get("norm_kernel")}: {d["step_ms"]} ms/step, {d["tokens_per_s"]} tok/s, '
          f'host {d["host_ms"]}')
lora = by.get(("lora", 1))
for k in (1, 0):
    if lora and ("dora", k) in by:
        print(f'DoRA (norm kernel {"on" if k else "off"}) / LoRA tok/s: {by[("dora", k)]["tokens_per_s"] / lora["tokens_per_s"]:.3f} (target >= 0.95)')
PY

if command -v ncu > /dev/null && (( SECONDS - start < 90 )); then
  LORAHUB_BENCH_PROFILE_STEP=1 timeout 45 ncu --profile-from-start off --clock-control none --kernel-name regex:lh_lora_lowrank_norms \
    --metrics gpu__time_duration.sum --csv --log-file "$out/ncu-dora-norm.csv" \
    dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b dora 4 2048 0 3 cuda:0 > /dev/null 2>&1
  python3 - "$out/ncu-dora-norm.csv" <<'PY'
import csv, sys, collections
try:
    rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if not l.startswith("==")) if r.get("Metric Name") == "gpu__time_duration.sum"]
except FileNotFoundError:
    sys.exit(print("ncu: no output"))
total = collections.Counter(); count = collections.Counter()
for r in rows:
    us = float(r["Metric Value"].replace(",", "")) * {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[r["Metric Unit"]]
    total[r["Kernel Name"].split("(")[0]] += us; count[r["Kernel Name"].split("(")[0]] += 1
for k in total: print(f"{k}: {count[k]} launches, {total[k]:.0f} us in one step (sum)")
by_grid = collections.defaultdict(list)
for r in rows: by_grid[r["Grid Size"]].append(float(r["Metric Value"].replace(",", "")) * {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0}.get(r["Metric Unit"], 1.0))
for g, v in by_grid.items(): print(f"  grid {g}: {len(v)} launches, mean {sum(v) / len(v):.1f} us")
PY
fi
echo "total: $((SECONDS - start)) s"
