#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, q/k/v's LoRA B-updates and DoRA
# row scales applied inside the rope kernel (FusedOps/RopeLowRankKernels.cs, LoraQkvRopeFunction.cs,
# LoraFusion.TryQkvRope; switch LORAHUB_QKV_ROPE_EPILOGUE). Within ~115 s:
# Bench first, then tests while time is left (BUDGET seconds, default 115: the call's hard limit is 120 s).
#   1. Tests on CUDA: LoraQkvRopeTests (fused vs composite: outputs and the gradients of x, A, B, c / m; GQA and MHA,
#      bf16/fp16/fp32, ranks 8..64, packed tables, odd head_dim/2; the switch; a program that does not compile),
#      LoraQkvRopeAttentionTests (a Llama with rank-16 q/k/v updates
#      and m/n row scales, path on vs off), and the Llama blocks end to end with the path on by default:
#      FusedLoraBlockTests (LoRA), FusedDoraBlockTests (DoRA). Log: $OUT/H1/tests.log. With LORAHUB_QKV_ROPE_BENCH the
#      kernels are also timed alone at llama-1b's q/k/v (8192 tokens, 32/8 heads, bf16, r16; 128 and 256 threads) against
#      what they replace (3 addmm, 3 row-scale passes, the rope kernel; backward: rope + 3 row-scale backward): qkv-bench.txt.
#   2. (first) llama-1b r16 4x2048, 12 timed steps: LoRA and DoRA with the epilogue on (default; LoRA also with its
#      tensor-core forward, LORAHUB_QKV_ROPE_MMA=1) and off
#      (LORAHUB_QKV_ROPE_EPILOGUE=0): $OUT/H1/bench.jsonl and one summary line each (the bench's "qkv_rope_epilogue" field,
#      LoraFusion.QkvRopeEpilogue: blocks run, launches, why last declined; the blocks report "qkv: fused" either way).
#   3. With NCU=1 (~60 s more): Nsight Compute of one LoRA and one DoRA step, the kernels around q/k/v only
#      (lh_rope_*, lh_lowrank_*, lh_lora_rowscale_*, cuBLAS's gemm): $OUT/H1/ncu-*.txt.
set -uo pipefail
source scripts/gpu/env.sh
out="$(realpath -m "${OUT:-/tmp/lorahub-out}")/H1"; mkdir -p "$out"
start=$SECONDS
log="$out/bench.jsonl"; : > "$log"
for v in "lora" "lora LORAHUB_QKV_ROPE_EPILOGUE=0" "lora LORAHUB_QKV_ROPE_MMA=1" "dora" "dora LORAHUB_QKV_ROPE_EPILOGUE=0" \
    ${EXTRA_BENCH:-}; do
  read -r method envs <<< "$v"
  echo "== $v" >> "$log"
  env $envs timeout 30 dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b "$method" 4 2048 0 12 cuda:0 2>&1 \
    | grep -E '^\{|LoRAHub:|rror|xception' | tail -4 >> "$log"
done
python3 - "$log" <<'PY'
import json, sys
label = ""
for line in open(sys.argv[1]):
    if line.startswith("== "): label = line[3:].strip(); continue
    if not line.startswith("{"): print(label, line.strip()[:300]); continue
    d = json.loads(line)
    print(f'{label}: tokens_per_s {d.get("tokens_per_s")}, step {d.get("step_ms")} ms, peak {d.get("peak_gib")} GiB, loss {d.get("loss")} | {d.get("paths")} | qkv_rope: {d.get("qkv_rope_epilogue")} | lowrank: {d.get("backward_lowrank_kernels")}')
PY
echo "bench: $((SECONDS - start)) s"

: > "$out/qkv-bench.txt"
left() { echo $(( ${BUDGET:-115} - (SECONDS - start) )); }
# Tests with what time is left (the call's hard limit): this path's own first, the Llama blocks after.
if (( $(left) > 20 )); then
  { LORAHUB_QKV_ROPE_BENCH="$out/qkv-bench.txt" TIMEOUT=$(left) xunit_cuda LoRAHub.TorchExtensions.Tests LoraQkvRopeTests
    (( $(left) > 15 )) && TIMEOUT=$(left) xunit_cuda LoRAHub.Models.Tests LoraQkvRopeAttentionTests
    (( $(left) > 20 )) && TIMEOUT=$(left) xunit_cuda LoRAHub.LoRA.Tests FusedLoraBlockTests
    (( $(left) > 20 )) && TIMEOUT=$(left) xunit_cuda LoRAHub.DoRA.Tests FusedDoraBlockTests; } > "$out/tests.log" 2>&1
fi
grep -E "did not compile" -A20 "$out/tests.log" | head -30
grep -E "Total:|\[FAIL\]" -A8 "$out/tests.log" | head -60
cat "$out/qkv-bench.txt"
echo "tests: $((SECONDS - start)) s"

if [[ ${NCU:-0} == 1 ]] && command -v ncu > /dev/null; then
  for m in lora dora; do
    LORAHUB_BENCH_PROFILE_STEP=1 timeout 120 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
      --kernel-name regex:"lh_rope|lh_lowrank|lh_lora_rowscale|lh_lora_col_reduce|gemm|foreach" \
      --log-file "$out/ncu-$m.csv" dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b $m 4 2048 0 3 cuda:0 2>&1 | grep -v '^==PROF==' | tail -1
    python3 - "$out/ncu-$m.csv" > "$out/ncu-$m.txt" <<'PY'
import csv, sys
from collections import defaultdict
UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
lines = [l for l in open(sys.argv[1], newline="") if l.startswith('"')]
groups = defaultdict(list)
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum": continue
    name = r["Kernel Name"].split("(")[0][:60]
    groups[(name, r["Grid Size"])].append(float(r["Metric Value"].replace(",", "")) * UNIT.get(r["Metric Unit"], 1.0))
print(f'{"kernel":60} {"grid":>16} {"n":>4} {"mean us":>9} {"total us":>10}')
for (name, grid), us in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
    print(f"{name:60} {grid:>16} {len(us):4d} {sum(us) / len(us):9.1f} {sum(us):10.1f}")
PY
    echo "== ncu $m (one step; the kernels around q/k/v)"; head -25 "$out/ncu-$m.txt"
  done
fi
echo "total: $((SECONDS - start)) s"
