#!/usr/bin/env bash
# There (a 2-GPU machine, kind nvidia-h200-x2, from the repo root, after scripts/gpu/prepare.sh here): every single-GPU
# check in one call, two lanes side by side so that it fits one device call:
#   GPU 0: run.sh (loraHub info, the main job, every published suite on cuda), the PEFT interop checks (plugins, matrix,
#          KaSA, head-aware LoRA, model families);
#   GPU 1: CUDA out of memory mid-training and resume, 10,000-step memory flatness, QLoRA llama-7b loading memory,
#          serve's batched multi-adapter throughput.
# Each step's log goes to a flat folder, packed into $OUT/all.tgz at the end (the device tool returns few files);
# $OUT/summary.txt has the lines that matter. LANES=0 or LANES=1 runs one lane only.
set -uo pipefail
source scripts/gpu/env.sh
export NCCL_NVLS_ENABLE=0
final="${OUT:-/tmp/lorahub-out}"; logs=/tmp/lorahub-all; rm -rf "$logs"; mkdir -p "$logs" "$final"
step() {   # step LANE NAME COMMAND...: runs on GPU LANE with its own $OUT, logs to $logs/NAME.log
  local lane=$1 name=$2; shift 2
  local start=$SECONDS
  mkdir -p "$logs/$name"
  CUDA_VISIBLE_DEVICES=$lane OUT="$logs/$name" "$@" > "$logs/$name.log" 2>&1
  echo "[gpu$lane] $name: exit $? in $((SECONDS - start)) s" | tee -a "$logs/steps.txt"
}
lane0() {
  SKIP_BINDING_BENCH=1 step 0 run bash scripts/gpu/run.sh
  step 0 peft bash scripts/peft/check.sh          # the plugins' fixtures, then the interop matrix
  step 0 kasa bash scripts/peft/check_variant.sh
  step 0 headlora bash scripts/peft/check_headlora.sh
  step 0 families bash scripts/fixtures/check_families.sh
}
lane1() {
  step 1 oom bash tests/LoRAHub.Reliability.Tests/gpu/oom.sh
  step 1 long-run bash tests/LoRAHub.Reliability.Tests/gpu/long_run.sh 10000
  step 1 qlora-load bash scripts/fixtures/qlora_load_memory.sh
  step 1 serve-bench bash src/Server/bench/serve-bench.sh
}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
case "${LANES:-01}" in
  0) lane0 ;;
  1) lane1 ;;
  *) lane0 & lane1 & wait ;;
esac
{
  cat "$logs/steps.txt"
  grep -hE "Total:|\[FAIL\]|main job|exact match" "$logs/run.log" | head -40
  grep -hE '^\{' "$logs"/*.log | cut -c1-400 | head -80
  grep -hE "check (ok|FAIL)|growth|long run" "$logs"/oom.log "$logs"/long-run.log "$logs"/long-run/* 2>/dev/null | head -20
} > "$final/summary.txt"
tar -C "$logs" -czf "$final/all.tgz" .
cat "$final/summary.txt"
