#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, the LoRA MLP's low-rank updates
# formed inside the SwiGLU kernels on tensor cores (src/TorchExtensions/FusedOps/LoraMlpKernels.cs). About 85 s:
#   1. Their tests on CUDA: LoraMlpMmaKernelTests (fused MLP vs the composite ops: output and the gradients of x, A's, B's;
#      bf16/fp16, ranks 0..64, odd token counts, partial column strips; register and pipelined kernels; DoRA's row scales
#      in the kernels (c and m/n); the approximate sigmoid; the kernels vs an fp64 reference; the pipelined kernels' bits
#      vs the register kernels'; the switch), LoraFusionTests, FusedLoraBlockTests (Llama with LoRA on all projections).
#      An NVRTC compile failure shows as "did not compile" with NVRTC's log. With LORAHUB_LORA_MLP_BENCH the kernels are
#      also timed alone at llama-1b's MLP (8192 × 8192 bf16, rank 16) per variant: stages (LORAHUB_LORA_MLP_KERNEL_STAGES:
#      0 = register kernels, 2/3 = cp.async pipeline), tokens per block (_ROWS, 0 = one wave), tiles per step (_MT),
#      backward blocks per SM (_BWD_BLOCKS), approximate sigmoid (_FAST_SIGMOID), DoRA's row scales (fwd_rs/bwd_rs); host
#      stopwatch over 30 queued launches (mlp-bench.txt).
#   2. llama-1b r16 4x2048, 12 timed steps: LoRA (defaults: pipelined kernels, 2 stages, approximate sigmoid), with the
#      exact sigmoid (FAST_SIGMOID=0), with the register kernels (STAGES=0); DoRA (gate/up row scales in these kernels by
#      default), with the exact sigmoid, and on the scaled SwiGLU kernels + addmm passes (ROWSCALE=0); EXTRA_BENCH="method
#      ENV=..." adds runs.
#   3. Nsight Compute over the same microbench (1 launch per variant, rank-16 bf16 kernels only, NCU_TIMEOUT s): per
#      kernel and grid the duration, DRAM throughput, instructions executed per element, issue-slot use, registers, warps
#      active, local-memory (spill) reads and the main stall reasons (ncu-bench.txt). NCU=0 skips it.
#   Session 6 (H200): forward 152 us (register kernels), backward 319 us; session 7 call A (microbench): register 154.6 /
#   309.8 us, pipelined (2 stages) 134.4 / 282.8 us, plain lh_swiglu_fwd 114 us; DoRA step 101.4 -> 99.6 ms with ROWSCALE.
#   Call B (ncu): forward 45 instructions per element at 81% issue (issue-bound), backward 60 at 60% issue, 70% DRAM;
#   approximate sigmoid 29 / 47 per element: forward 111 us, backward 231 us. (Call B's microbench backward numbers ran on
#   drifted in-place values; backward is now timed from restored inputs, the copies subtracted.)
# Output: $OUT/mlp-mma/ (mlp-mma-tests.log, mlp-bench.txt, mlp-mma.jsonl, ncu-bench.csv/txt).
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}/mlp-mma"; mkdir -p "$out"
log="$out/mlp-mma.jsonl"; : > "$log"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
start=$SECONDS

: > "$out/mlp-bench.txt"
{ LORAHUB_LORA_MLP_BENCH="$out/mlp-bench.txt" xunit_cuda LoRAHub.TorchExtensions.Tests LoraMlpMmaKernelTests LoraFusionTests
  xunit_cuda LoRAHub.LoRA.Tests FusedLoraBlockTests; } > "$out/mlp-mma-tests.log" 2>&1
grep -E "did not compile" -A30 "$out/mlp-mma-tests.log" | head -40
grep -E "Total:|\[FAIL\]" -A8 "$out/mlp-mma-tests.log" | head -60
cat "$out/mlp-bench.txt"
echo "tests: $((SECONDS - start)) s"

for v in "lora" "lora LORAHUB_LORA_MLP_KERNEL_FAST_SIGMOID=0" "lora LORAHUB_LORA_MLP_KERNEL_STAGES=0" "dora" \
    "dora LORAHUB_LORA_MLP_KERNEL_FAST_SIGMOID=0" "dora LORAHUB_LORA_MLP_KERNEL_ROWSCALE=0" ${EXTRA_BENCH:-}; do
  read -r method envs <<< "$v"
  echo "== $v" >> "$log"
  env $envs timeout 40 "${bench[@]}" train llama-1b "$method" 4 2048 0 12 cuda:0 2>&1 | grep -E '^\{|LoRAHub:|rror' | tail -3 >> "$log"
done
python3 scripts/gpu/bench_summary.py "$log" paths=paths mma=mlp_lowrank_kernels
echo "bench: $((SECONDS - start)) s"

if [[ ${NCU:-1} != 0 ]] && command -v ncu > /dev/null; then
  metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum
  metrics+=,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
  metrics+=,l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum
  for s in long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle lg_throttle not_selected no_instruction; do
    metrics+=,smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio
  done
  (cd .publish/tests && LORAHUB_TEST_DEVICE=cuda LORAHUB_LORA_MLP_BENCH=/dev/null LORAHUB_LORA_MLP_BENCH_ITERATIONS=1 timeout "${NCU_TIMEOUT:-15}" \
    ncu --clock-control none --kernel-name "regex:lh_lora_mlp_mma_(fwd|bwd)(_rs)?_bf16_k1_(m1|s2)(_fs)?$" --metrics "$metrics" \
    --csv --log-file "$out/ncu-bench.csv" dotnet exec --roll-forward Major --depsfile LoRAHub.TorchExtensions.Tests.deps.json \
    --runtimeconfig LoRAHub.TorchExtensions.Tests.runtimeconfig.json ../xunit-runner/xunit.console.dll \
    LoRAHub.TorchExtensions.Tests.dll -method "LoRAHub.TorchExtensions.Tests.LoraMlpMmaKernelTests.Llama_1b_shapes_timed_when_asked" \
    -nocolor > /dev/null 2>&1)
  python3 - "$out/ncu-bench.csv" > "$out/ncu-bench.txt" <<'PY'
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
elements = 8192 * 8192
stall = lambda m, s: m.get(f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio", 0)
for (i, name, grid), m in k.items():
    print(f'{name} grid={grid}: {m.get("gpu__time_duration.sum", 0):.1f} us, DRAM {m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", 0):.0f}%, '
          f'{32 * m.get("smsp__inst_executed.sum", 0) / elements:.1f} instr/element, issue {m.get("smsp__issue_active.avg.pct_of_peak_sustained_active", 0):.0f}%, '
          f'regs {m.get("launch__registers_per_thread", 0):.0f}, warps {m.get("sm__warps_active.avg.pct_of_peak_sustained_active", 0):.0f}%, '
          f'local ld {m.get("l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum", 0) / 1e6:.1f} MB | stalls/issue: long_sb {stall(m, "long_scoreboard"):.2f} '
          f'short_sb {stall(m, "short_scoreboard"):.2f} wait {stall(m, "wait"):.2f} math {stall(m, "math_pipe_throttle"):.2f} '
          f'mio {stall(m, "mio_throttle"):.2f} lg {stall(m, "lg_throttle"):.2f} not_sel {stall(m, "not_selected"):.2f} no_inst {stall(m, "no_instruction"):.2f}')
PY
  cat "$out/ncu-bench.txt"
  echo "ncu: $((SECONDS - start)) s"
fi
echo "total: $((SECONDS - start)) s"
