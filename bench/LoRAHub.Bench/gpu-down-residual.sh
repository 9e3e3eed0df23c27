#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, the decoder's output
# h + mlp(normed) with down_proj's LoRA update and DoRA row scale in one kernel after the base GEMM
# (src/TorchExtensions/FusedOps/LoraDownResidualKernels.cs, LORAHUB_DOWN_RESIDUAL_EPILOGUE). At most ~72 s, in order:
#   1. LoraDownResidualTests on CUDA (<= 30 s: fused MLP with the residual vs r + the composite ops: output and the
#      gradients of x, r, A's, B's, c / m; the kernel vs an fp64 reference; switch off; a kernel that does not compile;
#      llama-1b's 8192 x 2048 bf16 rank 16 against addmm + rowscale + add, timed per grid: down-bench.txt).
#   2. llama-1b r16 4x2048, 8 timed steps: DoRA and LoRA with the switch on (default) and off, pairs repeated while the
#      time allows (~5 s a run in call A).
# Call A (08:57): LoRA on 88,679 / 89,315 vs off 87,825 / 88,176 tok/s; DoRA on 82,237 / 81,917 vs off 82,050 / 82,883.
# Output: $OUT/H4/ (tests.log, down-bench.txt, bench.jsonl).
set -uo pipefail
source scripts/gpu/env.sh
out="$(realpath -m "${OUT:-/tmp/lorahub-out}")/H4"; mkdir -p "$out"
start=$SECONDS
: > "$out/down-bench.txt"
LORAHUB_DOWN_RESIDUAL_BENCH="$out/down-bench.txt" TIMEOUT=30 xunit_cuda LoRAHub.TorchExtensions.Tests LoraDownResidualTests \
  > "$out/tests.log" 2>&1
grep -E "Total:|\[FAIL\]" -A8 "$out/tests.log" | head -30
cat "$out/down-bench.txt"
echo "tests: $((SECONDS - start)) s"

log="$out/bench.jsonl"; : > "$log"
off=LORAHUB_DOWN_RESIDUAL_EPILOGUE=0
for v in "dora" "dora $off" "lora" "lora $off" "dora" "dora $off" "lora" "lora $off" "dora" "dora $off"; do
  if (( SECONDS - start > 60 )); then echo "skipped (time): $v"; continue; fi
  read -r method envs <<< "$v"
  echo "== $v" >> "$log"
  env $envs timeout $(( 72 - (SECONDS - start) )) dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b "$method" 4 2048 0 8 cuda:0 2>&1 \
    | grep -E '^\{|LoRAHub:|rror' | tail -3 >> "$log"
done
python3 scripts/gpu/bench_summary.py "$log" residual=mlp_residual_kernel
echo "total: $((SECONDS - start)) s"
