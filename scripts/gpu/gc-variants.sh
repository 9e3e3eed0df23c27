#!/usr/bin/env bash
# There (GPU machine): the training benchmark under garbage-collector settings, to see what collections cost the host
# (the bench's "gc" field: collections and pause per timed step). Plan: "SHAPE METHOD BATCH SEQ CKPT" (default llama-1b LoRA).
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
p=${1:-"llama-1b lora 4 2048 0"}
# Host cost without the GPU's pace: at batch 1 the GPU work shrinks ~4x while the host's launches stay the same, so
# host_ms there is what the host needs (at batch 4 a full launch queue can make the host wait for the GPU).
dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b lora 1 2048 0 12 cuda:0 2>&1 | grep '^{' | sed 's/^{/{"env":"batch1",/' | cut -c1-420 | tee -a "$out/gc-variants.jsonl"
for v in ${VARIANTS:-"X=1" "LORAHUB_BENCH_CUDNN_SDPA=0" "DOTNET_GCgen0size=0x4000000" "DOTNET_GCgen0size=0x10000000" "DOTNET_gcConcurrent=0" "DOTNET_TieredCompilation=0"}; do
  echo "== $v"
  env $v dotnet .publish/tests/LoRAHub.Bench.dll train $p 12 cuda:0 2>&1 | grep '^{' | sed "s/^{/{\"env\":\"$v\",/" | cut -c1-420 | tee -a "$out/gc-variants.jsonl"
done
