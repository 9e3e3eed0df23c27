#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, q/k/v's LoRA B-updates and DoRA
# row scales applied inside the rope kernel (FusedOps/RopeLowRankKernels.cs, LoraQkvRopeFunction.cs,
# LoraFusion.TryQkvRope; switches LORAHUB_QKV_ROPE_EPILOGUE (default off), _EPILOGUE_DORA (off), LORAHUB_QKV_ROPE_MMA (off)). Within BUDGET seconds
# (default 95; TEST_TIMEOUT for the tests, default 55):
#   1. LoraQkvRopeTests on CUDA (<= 55 s; call B's 35 s ended inside NVRTC's compiles): fused vs composite (outputs and the gradients of x, A, B, c / m; GQA and MHA,
#      bf16/fp16/fp32, ranks 8..64, packed tables, odd head_dim/2, every launch shape, the tensor-core forward; the
#      switch; a program that does not compile; the deferred q/k/v function), and with LORAHUB_QKV_ROPE_BENCH the kernels
#      timed alone at llama-1b's q/k/v (8192 tokens, 32/8 heads of 64, bf16, r16) against what they replace (3 addmm, the
#      row-scale passes, the rope kernel; backward: rope + row-scale backward): $OUT/H1/tests.log, qkv-bench.txt.
#   2. llama-1b r16 4x2048, 8 timed steps, while time is left: LoRA with the path (EPILOGUE=1) vs
#      the default (off) vs the path with the tensor-core forward (MMA=1), then DoRA with the path (EPILOGUE=1 and
#      EPILOGUE_DORA=1) vs its default (off): $OUT/H1/bench.jsonl and one summary line each (the bench's "qkv_rope_epilogue" field:
#      blocks run, launches, why last declined; the blocks report "qkv: fused" either way).
# Other suites that cover the path end to end (run them where time allows): LoRAHub.Models.Tests LoraQkvRopeAttentionTests,
# LoRAHub.LoRA.Tests FusedLoraBlockTests, LoRAHub.DoRA.Tests FusedDoraBlockTests.
set -uo pipefail
source scripts/gpu/env.sh
out="$(realpath -m "${OUT:-/tmp/lorahub-out}")/H1"; mkdir -p "$out"
start=$SECONDS
budget=${BUDGET:-95}
left() { echo $(( budget - (SECONDS - start) )); }

# 1. This path's tests on CUDA with the kernel microbench (qkv-bench.txt), <= 55 s (NVRTC compiles the programs first).
: > "$out/qkv-bench.txt"
LORAHUB_QKV_ROPE_BENCH="$out/qkv-bench.txt" TIMEOUT=${TEST_TIMEOUT:-55} xunit_cuda LoRAHub.TorchExtensions.Tests LoraQkvRopeTests \
  > "$out/tests.log" 2>&1
grep -E "did not compile" -A20 "$out/tests.log" | head -30
grep -E "Total:|\[FAIL\]" -A8 "$out/tests.log" | head -40
cat "$out/qkv-bench.txt"
echo "tests: $((SECONDS - start)) s"

# 2. llama-1b r16 4x2048, 8 timed steps, on/off pairs while time is left (each run gets what is left, at most 40 s).
log="$out/bench.jsonl"; : > "$log"
for v in "lora LORAHUB_QKV_ROPE_EPILOGUE=1" "lora" "lora LORAHUB_QKV_ROPE_EPILOGUE=1 LORAHUB_QKV_ROPE_MMA=1" \
    "dora LORAHUB_QKV_ROPE_EPILOGUE=1 LORAHUB_QKV_ROPE_EPILOGUE_DORA=1" "dora" ${EXTRA_BENCH:-}; do
  (( $(left) < 14 )) && break
  read -r method envs <<< "$v"
  echo "== $v" >> "$log"
  t=$(left); (( t > 40 )) && t=40
  env $envs timeout $t dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b "$method" 4 2048 0 8 cuda:0 2>&1 \
    | grep -E '^\{|LoRAHub:|rror|xception' | tail -4 >> "$log"
done
python3 scripts/gpu/bench_summary.py "$log" qkv_rope=qkv_rope_epilogue
echo "total: $((SECONDS - start)) s"
