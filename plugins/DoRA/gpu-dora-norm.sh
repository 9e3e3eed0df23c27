#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): DoRA's low-rank norm kernel
# (LoraWeightNorms.low_rank_row_norms, issue 19: was 112 launches × ~42 us = 4.7 ms per llama-1b step). About 80-100 s:
#   1. The DoRA suite on CUDA (NormKernelSplitTests: the column-split kernel vs DoraWeightNorm.Direct and fp64 on the
#      Llama-1B shapes and on partial blocks/tiles/rank chunks, same bits on a repeated launch, other split counts; plus
#      NormKernelTests and every other DoRA test). With LORAHUB_DORA_NORM_BENCH the Llama-1B shapes are also timed per
#      LORAHUB_DORA_NORM_BLOCKS_PER_SM setting (host stopwatch over 200 launches: the small shapes are bound by the
#      launch rate there). Log: $OUT/dora-norm-tests.log; timings: $OUT/dora-norm-bench.txt.
#   2. The kernel's own GPU time in one llama-1b DoRA step under Nsight Compute (112 launches), by grid.
#   3. llama-1b r16 4x2048 DoRA, 12 timed steps: tok/s and host_ms (JSON in $OUT/dora-norm.jsonl).
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
start=$SECONDS

( cd .publish/tests && LORAHUB_TEST_DEVICE=cuda LORAHUB_DORA_NORM_BENCH="$out/dora-norm-bench.txt" timeout 120 \
    dotnet exec --roll-forward Major --depsfile LoRAHub.DoRA.Tests.deps.json --runtimeconfig LoRAHub.DoRA.Tests.runtimeconfig.json \
    ../xunit-runner/xunit.console.dll LoRAHub.DoRA.Tests.dll -nocolor 2>&1 ) > "$out/dora-norm-tests.log"
grep -E "Total:|\[FAIL\]" -A8 "$out/dora-norm-tests.log" | head -40
grep -i "did not compile\|NVRTC" "$out/dora-norm-tests.log" | head -3
cat "$out/dora-norm-bench.txt" 2>/dev/null
echo "tests: $((SECONDS - start)) s"

if command -v ncu > /dev/null; then
  LORAHUB_BENCH_PROFILE_STEP=1 timeout 50 ncu --profile-from-start off --clock-control none --kernel-name regex:lh_lora_lowrank_norms \
    --metrics gpu__time_duration.sum,launch__registers_per_thread,launch__occupancy_limit_registers --csv \
    --log-file "$out/ncu-dora-norm.csv" dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b dora 4 2048 0 3 cuda:0 > /dev/null 2>&1
  python3 - "$out/ncu-dora-norm.csv" <<'PY'
import csv, sys, collections
try:
    rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if not l.startswith("=="))]
except FileNotFoundError:
    sys.exit(print("ncu: no output"))
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
times = collections.defaultdict(list); other = collections.defaultdict(dict)
for r in rows:
    if r["Metric Name"] == "gpu__time_duration.sum":
        times[r["Grid Size"]].append(float(r["Metric Value"].replace(",", "")) * scale.get(r["Metric Unit"], 1.0))
    else:
        other[r["Grid Size"]][r["Metric Name"]] = r["Metric Value"]
total = sum(sum(v) for v in times.values())
print(f"lh_lora_lowrank_norms: {sum(len(v) for v in times.values())} launches, {total:.0f} us in one step (was 4690)")
for g, v in times.items():
    print(f"  grid {g}: {len(v)} launches, mean {sum(v) / len(v):.1f} us  {other[g]}")
PY
fi
echo "ncu: $((SECONDS - start)) s"

timeout 60 dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b dora 4 2048 0 12 cuda:0 2>&1 | grep -v '^   at ' | tail -2 \
  | tee -a "$out/dora-norm.jsonl"
echo "total: $((SECONDS - start)) s"
