#!/usr/bin/env bash
# There (GPU machine, after scripts/gpu/prepare.sh here): the GPU's timeline of one timed training step — where the GPU
# idles between kernels and which host CUDA calls ran then (synchronizations, copies, late launches). The machine has no
# Nsight Systems: scripts/gpu/cupti_trace.c, built here against the CUPTI that comes with CUDA (the toolkit or PyTorch's
# nvidia-cuda-cupti wheel), is injected into the bench (CUDA_INJECTION64_PATH) and records every kernel and API call; the
# bench marks timed step STEP (default 2) with cuProfilerStart/Stop (LORAHUB_BENCH_PROFILE_STEP) and
# scripts/gpu/timeline_gaps.py keeps the work launched between them. For each plan line "SHAPE METHOD BATCH SEQ CKPT"
# (default llama-1b LoRA 4×2048). DDP=1: the plan runs as 2 ranks on GPUs 0 and 1 (torchrun's variables set here), rank
# 0 traced. Writes $OUT/tl-<plan>_{gpu,api}.csv.xz and the summary $OUT/tl-<plan>.txt.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
lib=/tmp/lorahub-cupti/libcupti_trace.so
if [[ ! -f $lib ]]; then
  mkdir -p /tmp/lorahub-cupti
  site=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
  header=$(ls /usr/local/cuda/extras/CUPTI/include/cupti.h /usr/local/cuda*/extras/CUPTI/include/cupti.h /usr/local/cuda*/include/cupti.h \
    /usr/local/cuda*/targets/*/include/cupti.h "$site"/nvidia/*/include/cupti.h "$site"/nvidia/*/*/include/cupti.h 2>/dev/null | head -1)
  so=$(ls /usr/local/cuda/extras/CUPTI/lib64/libcupti.so* /usr/local/cuda*/extras/CUPTI/lib64/libcupti.so* /usr/local/cuda*/lib64/libcupti.so* \
    /usr/local/cuda*/targets/*/lib/libcupti.so* "$site"/nvidia/*/lib/libcupti.so* "$site"/nvidia/*/*/lib/libcupti.so* 2>/dev/null | head -1)
  cuda_inc=$(dirname "$(command -v nvcc)")/../include
  echo "cupti header: ${header:-none}, library: ${so:-none}"
  [[ -z "$header" || -z "$so" ]] && { echo "timeline-step.sh: no CUPTI header or library found"; exit 2; }
  for rec in CUpti_ActivityKernel11 CUpti_ActivityKernel10 CUpti_ActivityKernel9; do
    # Copy and fill records (their versions differ between CUPTI releases); the last try leaves them out.
    for copies in "-DMREC=CUpti_ActivityMemcpy6 -DSREC=CUpti_ActivityMemset4" "-DMREC=CUpti_ActivityMemcpy5 -DSREC=CUpti_ActivityMemset4" "-DNO_COPIES"; do
      if gcc -O2 -shared -fPIC -DKREC=$rec $copies -I"$(dirname "$header")" -I"$cuda_inc" scripts/gpu/cupti_trace.c "$so" \
           -Wl,-rpath,"$(dirname "$so")" -o $lib 2>/tmp/lorahub-cupti/build-$rec.log; then echo "built with $rec $copies"; break 2; fi
    done
  done
  [[ -f $lib ]] || { echo "timeline-step.sh: the tracer did not build:"; tail -5 /tmp/lorahub-cupti/build-*.log; exit 2; }
fi
plan=("llama-1b lora 4 2048 0")
[[ $# -gt 0 ]] && plan=("$@")
step=${STEP:-2}
bench=(dotnet .publish/tests/LoRAHub.Bench.dll train)
for p in "${plan[@]}"; do
  name=$(echo "$p" | tr ' ' '-')$([[ -n "${DDP:-}" ]] && echo "-ddp2")
  trace=(CUDA_INJECTION64_PATH=$lib LORAHUB_TRACE_PREFIX="$out/tl-$name" LORAHUB_BENCH_PROFILE_STEP=$step)
  if [[ -n "${DDP:-}" ]]; then
    common=(WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((29700 + RANDOM % 200)))
    env "${common[@]}" RANK=1 LOCAL_RANK=1 "${bench[@]}" $p $((step + 3)) cuda:0 > "$out/tl-$name-rank1.log" 2>&1 &
    env "${common[@]}" RANK=0 LOCAL_RANK=0 "${trace[@]}" "${bench[@]}" $p $((step + 3)) cuda:0 2>&1 | grep '^{' | cut -c1-300
    wait
  else
    env "${trace[@]}" "${bench[@]}" $p $((step + 3)) cuda:0 2>&1 | grep '^{' | cut -c1-300
  fi
  python3 scripts/gpu/timeline_gaps.py "$out/tl-${name}_gpu.csv" "$out/tl-${name}_api.csv" 40 > "$out/tl-$name.txt" 2>&1
  head -75 "$out/tl-$name.txt"
  xz -f -T2 "$out/tl-${name}_gpu.csv" "$out/tl-${name}_api.csv"
done
