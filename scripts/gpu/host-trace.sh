#!/usr/bin/env bash
# There (GPU machine, after scripts/gpu/prepare.sh here): where the HOST time of a training step goes. Runs LoRAHub.Bench
# on each plan line "SHAPE METHOD BATCH SEQ CKPT" (default: llama-1b LoRA 4×2048) with the runtime's own EventPipe
# (no tool needed there): CPU samples of every managed thread (libtorch's autograd thread runs our C# backward functions)
# and GC events, into $OUT/trace-<plan>.nettrace.xz. Here: `dotnet-trace convert --format speedscope` and
# scripts/gpu/host_profile.py to sum the samples by method.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
plan=("llama-1b lora 4 2048 0")
[[ $# -gt 0 ]] && plan=("$@")
for p in "${plan[@]}"; do
  name=$(echo "$p" | tr ' ' '-')
  DOTNET_EnableEventPipe=1 DOTNET_EventPipeOutputPath="$out/trace-$name.nettrace" DOTNET_EventPipeCircularMB=1024 \
    DOTNET_EventPipeConfig='Microsoft-DotNETCore-SampleProfiler:0:5,Microsoft-Windows-DotNETRuntime:0x1:4' \
    dotnet .publish/tests/LoRAHub.Bench.dll train $p 12 cuda:0 2>&1 | grep '^{' | cut -c1-600
  xz -T0 -3 "$out/trace-$name.nettrace" && ls -la "$out/trace-$name.nettrace.xz"
done
