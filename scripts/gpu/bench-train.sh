#!/usr/bin/env bash
# There (GPU machine, after scripts/gpu/run.sh built the shim into /tmp/lh-native): our training benchmark on the
# shapes of ../shared/bench/peer_bench.py. Arguments: lines of "SHAPE METHOD BATCH SEQ CKPT" (default: the peer's plan).
set -uo pipefail
eval "$(.gpu/setup-runtime.sh .gpu)"
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
export LORAHUB_NATIVE=/tmp/lh-native/liblorahub_native.so
plan=("llama-1b full 4 2048 0" "llama-1b lora 4 2048 0" "llama-1b dora 4 2048 0" "llama-1b lora 4 2048 1"
      "llama-7b lora 2 2048 1" "llama-7b dora 2 2048 1" "llama-7b qlora 2 2048 1" "llama-1b galore 4 2048 0")
[[ $# -gt 0 ]] && plan=("$@")
for p in "${plan[@]}"; do
  dotnet .publish/LoRAHub.Bench/LoRAHub.Bench.dll train $p 8 cuda:0 2>&1 | grep -v '^   at ' | tail -4 | tee -a "$out/train-bench.jsonl"
done
