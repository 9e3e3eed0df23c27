#!/usr/bin/env bash
# There (GPU machine, after scripts/gpu/prepare.sh here): every kernel of one timed training step of LoRAHub.Bench under
# Nsight Compute (kernel durations only: gpu__time_duration, clocks left alone), for each plan line
# "SHAPE METHOD BATCH SEQ CKPT" given (default: llama-1b LoRA 4×2048). The bench marks the step with cuProfilerStart/Stop
# (LORAHUB_BENCH_PROFILE_STEP), so setup and warm-up are not profiled. Writes $OUT/ncu-<plan>.csv and a summary by
# kernel family (scripts/gpu/ncu_summary.py) to $OUT/ncu-<plan>.txt. ncu serializes kernels: durations are each kernel's
# own, without overlap or host gaps.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
plan=("llama-1b lora 4 2048 0")
[[ $# -gt 0 ]] && plan=("$@")
for p in "${plan[@]}"; do
  name=$(echo "$p" | tr ' ' '-')
  LORAHUB_BENCH_PROFILE_STEP=1 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
    --log-file "$out/ncu-$name.csv" dotnet .publish/tests/LoRAHub.Bench.dll train $p 3 cuda:0 2>&1 | grep -v '^==PROF==' | tail -3
  python3 scripts/gpu/ncu_summary.py "$out/ncu-$name.csv" > "$out/ncu-$name.txt" 2>&1
  head -45 "$out/ncu-$name.txt"
done
# PEER=1: the peer (transformers + PEFT) on the same plans, one step marked the same way (scripts/gpu/peer_profile.py).
if [[ -n "${PEER:-}" ]]; then
  for p in "${plan[@]}"; do
    name=$(echo "$p" | tr ' ' '-')
    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
      --log-file "$out/ncu-peer-$name.csv" python3 scripts/gpu/peer_profile.py $p 2>&1 | grep -v '^==PROF==' | tail -2
    python3 scripts/gpu/ncu_summary.py "$out/ncu-peer-$name.csv" > "$out/ncu-peer-$name.txt" 2>&1
    head -45 "$out/ncu-peer-$name.txt"
  done
fi
