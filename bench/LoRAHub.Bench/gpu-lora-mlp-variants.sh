#!/usr/bin/env bash
# There (GPU machine, from the repo root): issue 19, the LoRA MLP tensor-core kernels' variants toward HBM bandwidth
# (src/TorchExtensions/FusedOps/LoraMlpKernels.cs, LoraMlpKernelVariant.cs; LORAHUB_LORA_MLP_KERNEL_VARIANT="fwd,bwd",
# each "s{stages}v{flags}b{blocks}[@rows]"; defaults since session 8: LoRA s2v17b4@128,s2v9b2@256, DoRA (LORAHUB_LORA_MLP_KERNEL_
# VARIANT_DORA) s2v1b4@128,s2v9b2@256; "today" in the microbench = LORAHUB_LORA_MLP_KERNEL_VARIANT=0). Session 8 (H200, µs a
# layer with down's thin products formed): forward 151.4 -> 133.2 (s2v17b4), backward 276.1 -> 201.2 (s2v9b2@256); the
# LM_XS variants (thin rows through the stages) ran 190-420 µs (slow). About 95 s; each stage skips itself once the time
# spent says it would not finish:
#   1. The microbench (LoraMlpKernelVariantTests.Variant_kernels_timed_when_asked): llama-1b's MLP (8192 × 8192 bf16,
#      r16) per variant, LoRA and DoRA kernels, µs and the DRAM rate the kernel's bytes make, against torch's add and
#      copy (variant-bench.txt; lists VARIANTS_FWD, VARIANTS_BWD); then LoraMlpKernelVariantTests on CUDA (every
#      variant's bits against today's kernels: h, dg, du, h, DoRA's dc; fast and exact sigmoid; bf16/fp16; partial
#      tiles and strips; one wave; taken only at rank 16).
#   2. llama-1b r16 4x2048, 8 timed steps: LoRA default vs LoRA with the microbench's fastest forward and backward
#      variant and tokens per block (bench.jsonl; a summary line after each run).
#   3. Nsight Compute over a shorter microbench (NCU_FWD, NCU_BWD; two launches each, LoRA kernels): duration, DRAM %,
#      warps active, issue %, instructions per element, registers, long-scoreboard stalls, L2 hit rate (ncu.txt). NCU=0
#      skips it.
#   4. DoRA default vs DoRA with its fastest pair; EXTRA_BENCH="method ENV=..." adds a run.
#   5. If time is left: LoRA FusedLoraBlockTests with the picked variants (lora-tests.log), LoraMlpMmaKernelTests (today's
#      kernels: a regression check).
# Output: $OUT/H3/ (variant-tests.log, variant-bench.txt, bench.jsonl, ncu.txt, lora-tests.log, mma-tests.log).
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}/H3"; mkdir -p "$out"
start=$SECONDS
# QUICK=1 (a short call, <= 75 s): a short microbench (<= 12 s) and the tests (both done by 30 s), then LoRA with the
# picked pair, then LoRA default while under 50 s, then DoRA default and picked while under 58 s (a run: ~6-8 s).
if [[ ${QUICK:-0} == 1 ]]; then
  : "${VARIANTS_FWD:=today s2v1b4 s2v17b4}" "${VARIANTS_BWD:=today s3v1b3 s2v9b2@128 s2v9b2@256 s3v13b2@256 s3v9b3@256}"
  : "${TEST_TIMEOUT:=30}" "${BENCH_TIMEOUT:=12}" "${NCU:=0}" "${DORA_LIMIT:=58}" "${TAIL:=0}"
fi
fwd_list=${VARIANTS_FWD:-"today s2v0b4 s2v1b4 s3v1b4 s3v5b3 s4v1b3 s2v16b4 s2v17b4 s3v17b4 s3v21b3 s2v17b4@64 s2v17b4@256 today@256"}
bwd_list=${VARIANTS_BWD:-"today s2v1b3 s3v1b3 s2v5b2 s3v5b2 s3v1b3@128 today@128 s2v9b2 s2v9b2@128 s2v9b2@256 s2v9b2@512 s3v9b2@256 s2v13b2@256 s3v13b2@256 s2v8b2@256 s2v9b3@256"}

: > "$out/variant-bench.txt"
LORAHUB_LORA_MLP_VARIANT_BENCH="$out/variant-bench.txt" LORAHUB_LORA_MLP_VARIANT_BENCH_FWD="$fwd_list" \
  LORAHUB_LORA_MLP_VARIANT_BENCH_BWD="$bwd_list" TIMEOUT=${BENCH_TIMEOUT:-40} xunit_cuda LoRAHub.TorchExtensions.Tests \
  -method LoRAHub.TorchExtensions.Tests.LoraMlpKernelVariantTests.Variant_kernels_timed_when_asked > "$out/variant-tests.log" 2>&1
cat "$out/variant-bench.txt"
echo "microbench: $((SECONDS - start)) s"
# The tests after the microbench: most of their variants' programs are in the kernel cache by now.
left=$((${TEST_TIMEOUT:-60} - (SECONDS - start))); (( left < 15 )) && left=15
TIMEOUT=$left xunit_cuda LoRAHub.TorchExtensions.Tests LoraMlpKernelVariantTests >> "$out/variant-tests.log" 2>&1
grep -E "did not compile" -A20 "$out/variant-tests.log" | head -30
grep -E "Total:|\[FAIL\]" -A8 "$out/variant-tests.log" | head -60
echo "tests: $((SECONDS - start)) s"

# The fastest forward and backward (LoRA, and DoRA's row-scale kernels) as env for the bench: VARIANT and ROWS pairs.
pick() {  # $1: lora|dora
  python3 - "$out/variant-bench.txt" "$1" <<'PY'
import re, sys
best = {}
for line in open(sys.argv[1]):
    m = re.match(r"variant-bench (fwd|bwd) (\S+) rows=(\d+) lora us=([\d.]+)\S* TB/s=\S+ dora us=([\d.]+)(.*)", line)
    if not m or "NOT TAKEN" in m.group(6): continue
    op, name, rows, us = m.group(1), m.group(2), m.group(3), float(m.group(4) if sys.argv[2] == "lora" else m.group(5))
    if op not in best or us < best[op][0]: best[op] = (us, name, rows)
if len(best) == 2:
    v = lambda op: "0" if best[op][1] == "today" else f"{best[op][1]}@{best[op][2]}"
    print(f'LORAHUB_LORA_MLP_KERNEL_VARIANT={v("fwd")},{v("bwd")} LORAHUB_LORA_MLP_KERNEL_ROWS={best["fwd"][2]},{best["bwd"][2]}')
PY
}
lora_best=$(pick lora); dora_best=$(pick dora)
echo "picked: lora [$lora_best] dora [$dora_best]"

: > "$out/bench.jsonl"
# bench LIMIT "method ENV=..." ...: 8 timed steps each (skipped once LIMIT seconds are spent), a summary line after each.
bench() {
  local limit=$1; shift
  for v in "$@"; do
    (( SECONDS - start > limit )) && { echo "skipped (time): $v"; continue; }
    read -r method envs <<< "$v"
    echo "== $v" >> "$out/bench.jsonl"
    env $envs timeout 25 dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b "$method" 4 2048 0 8 cuda:0 2>&1 | grep -E '^\{|LoRAHub:|rror' | tail -3 > "$out/run.txt"
    cat "$out/run.txt" >> "$out/bench.jsonl"
    python3 - "$out/run.txt" "$v" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"): print(sys.argv[2], line.strip()[:300]); continue
    d = json.loads(line)
    print(f'{sys.argv[2]}: tokens_per_s {d.get("tokens_per_s")}, step {d.get("step_ms")} ms, loss {d.get("loss")} | mma: {d.get("mlp_lowrank_kernels")}')
PY
  done
  rm -f "$out/run.txt"
}
if [[ ${QUICK:-0} == 1 ]]; then
  bench 50 ${lora_best:+"lora $lora_best"} "lora"
else
  bench 76 "lora" ${lora_best:+"lora $lora_best"}
fi
echo "bench lora: $((SECONDS - start)) s"

if [[ ${NCU:-1} != 0 ]] && command -v ncu > /dev/null && (( SECONDS - start < 55 )); then
  metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active
  metrics+=,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,smsp__inst_executed.sum
  metrics+=,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,lts__t_sector_hit_rate.pct
  (cd .publish/tests && LORAHUB_TEST_DEVICE=cuda LORAHUB_LORA_MLP_VARIANT_BENCH=/dev/null LORAHUB_LORA_MLP_BENCH_ITERATIONS=1 \
    LORAHUB_LORA_MLP_VARIANT_BENCH_FWD="${NCU_FWD:-today s3v1b4 s2v2b4 s3v2b3}" \
    LORAHUB_LORA_MLP_VARIANT_BENCH_BWD="${NCU_BWD:-today s3v1b3 s2v3b3 s2v11b3@128}" timeout "${NCU_TIMEOUT:-12}" \
    ncu --clock-control none --kernel-name "regex:lh_lora_mlp_mma_(fwd|bwd)_bf16_(k1_s2_fs|r16_.*)$" --metrics "$metrics" \
    --csv --log-file "$out/ncu.csv" dotnet exec --roll-forward Major --depsfile LoRAHub.TorchExtensions.Tests.deps.json \
    --runtimeconfig LoRAHub.TorchExtensions.Tests.runtimeconfig.json ../xunit-runner/xunit.console.dll \
    LoRAHub.TorchExtensions.Tests.dll -method "LoRAHub.TorchExtensions.Tests.LoraMlpKernelVariantTests.Variant_kernels_timed_when_asked" \
    -nocolor > /dev/null 2>&1)
  python3 - "$out/ncu.csv" > "$out/ncu.txt" <<'PY'
import csv, re, sys
from collections import OrderedDict
UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
try:
    lines = [l for l in open(sys.argv[1], newline="") if l.startswith('"')]
except FileNotFoundError:
    sys.exit(print("ncu: no output"))
k = OrderedDict()
for r in csv.DictReader(lines):
    key = (r["ID"], re.sub(r"\(.*", "", r["Kernel Name"]), r.get("Grid Size", ""))
    try:
        v = float(r["Metric Value"].replace(",", ""))
    except ValueError:
        continue
    if r["Metric Name"] == "gpu__time_duration.sum": v *= UNIT.get(r["Metric Unit"], 1.0)
    k.setdefault(key, {})[r["Metric Name"]] = v
for (i, name, grid), m in k.items():
    print(f'{name} grid={grid}: {m.get("gpu__time_duration.sum", 0):.1f} us, DRAM {m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", 0):.0f}%, '
          f'warps {m.get("sm__warps_active.avg.pct_of_peak_sustained_active", 0):.0f}%, issue {m.get("smsp__issue_active.avg.pct_of_peak_sustained_active", 0):.0f}%, '
          f'{32 * m.get("smsp__inst_executed.sum", 0) / 8192 ** 2:.1f} instr/element, regs {m.get("launch__registers_per_thread", 0):.0f}, '
          f'long_sb/issue {m.get("smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", 0):.2f}, L2 hit {m.get("lts__t_sector_hit_rate.pct", 0):.0f}%')
PY
  rm -f "$out/ncu.csv"
  cat "$out/ncu.txt"
  echo "ncu: $((SECONDS - start)) s"
fi

bench "${DORA_LIMIT:-76}" "dora" ${dora_best:+"dora $dora_best"} ${EXTRA_BENCH:+"$EXTRA_BENCH"}
echo "bench dora: $((SECONDS - start)) s"

# Llama with LoRA on every projection, fused vs composite, with the picked variants (the in-kernel gradients included).
pair=$(sed -n 's/.*LORAHUB_LORA_MLP_KERNEL_VARIANT=\([^ ]*\).*/\1/p' <<< "$lora_best")
if [[ ${TAIL:-1} == 1 && -n $pair && $pair != 0,0 ]] && (( SECONDS - start < 82 )); then
  LORAHUB_LORA_MLP_KERNEL_VARIANT=$pair TIMEOUT=$((97 - (SECONDS - start))) xunit_cuda LoRAHub.LoRA.Tests FusedLoraBlockTests \
    > "$out/lora-tests.log" 2>&1
  echo "FusedLoraBlockTests with variants $pair:"; grep -E "Total:|\[FAIL\]" -A8 "$out/lora-tests.log" | head -20
fi
if [[ ${TAIL:-1} == 1 ]] && (( SECONDS - start < 85 )); then
  TIMEOUT=$((97 - (SECONDS - start))) xunit_cuda LoRAHub.TorchExtensions.Tests LoraMlpMmaKernelTests > "$out/mma-tests.log" 2>&1
  grep -E "Total:|\[FAIL\]" -A8 "$out/mma-tests.log" | head -30
fi
echo "total: $((SECONDS - start)) s"
