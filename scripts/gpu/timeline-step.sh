#!/usr/bin/env bash
# There (GPU machine, after scripts/gpu/prepare.sh here): the GPU's timeline of one timed training step under Nsight
# Systems — where the GPU idles between kernels and which host calls were running then (synchronizations, copies, slow
# launches). For each plan line "SHAPE METHOD BATCH SEQ CKPT" given (default llama-1b LoRA 4×2048); the bench marks timed
# step STEP (default 2) with cuProfilerStart/Stop (LORAHUB_BENCH_PROFILE_STEP), so setup and warm-up are not captured.
# DDP=1: the plan runs as 2 ranks on GPUs 0 and 1 (torchrun's variables set here), rank 0 under nsys. Writes
# $OUT/tl-<plan>.nsys-rep, the CSV reports and scripts/gpu/timeline_gaps.py's summary ($OUT/tl-<plan>.txt).
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys /usr/local/cuda*/nsight-systems*/bin/nsys 2>/dev/null | head -1)
[[ -z "$nsys" ]] && { echo "timeline-step.sh: no nsys on this machine"; exit 2; }
plan=("llama-1b lora 4 2048 0")
[[ $# -gt 0 ]] && plan=("$@")
step=${STEP:-2}
for p in "${plan[@]}"; do
  name=$(echo "$p" | tr ' ' '-')$([[ -n "${DDP:-}" ]] && echo "-ddp2")
  prof=("$nsys" profile --trace=cuda,osrt --capture-range=cudaProfilerApi --capture-range-end=stop --force-overwrite=true -o "$out/tl-$name")
  if [[ -n "${DDP:-}" ]]; then
    common=(WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29700 + RANDOM % 200)))
    env "${common[@]}" RANK=1 LOCAL_RANK=1 dotnet .publish/tests/LoRAHub.Bench.dll train $p $((step + 3)) cuda:0 > "$out/tl-$name-rank1.log" 2>&1 &
    env "${common[@]}" RANK=0 LOCAL_RANK=0 LORAHUB_BENCH_PROFILE_STEP=$step "${prof[@]}" dotnet .publish/tests/LoRAHub.Bench.dll train $p $((step + 3)) cuda:0 2>&1 | grep -v '^==' | tail -3
    wait
  else
    LORAHUB_BENCH_PROFILE_STEP=$step "${prof[@]}" dotnet .publish/tests/LoRAHub.Bench.dll train $p $((step + 3)) cuda:0 2>&1 | grep -v '^==' | tail -3
  fi
  "$nsys" stats --report cuda_gpu_trace,cuda_api_trace --format csv --force-export=true --output "$out/tl-$name" "$out/tl-$name.nsys-rep" > /dev/null 2>&1
  python3 scripts/gpu/timeline_gaps.py "$out/tl-${name}_cuda_gpu_trace.csv" "$out/tl-${name}_cuda_api_trace.csv" > "$out/tl-$name.txt" 2>&1
  head -60 "$out/tl-$name.txt"
  rm -f "$out/tl-$name.sqlite"
done
