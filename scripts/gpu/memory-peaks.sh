#!/usr/bin/env bash
# There (GPU machine): our peak memory on the benchmark plan (default: llama-1b LoRA and DoRA 4×2048, llama-7b LoRA and
# QLoRA 2×2048 checkpointed) under cudaMallocAsync, where peak_gib is the pool's high-water mark, as the peer's
# torch.cuda.max_memory_allocated under the same setting (bench/README.md). JSON in $OUT/train-bench-memory.jsonl.
set -uo pipefail
plan=("llama-1b lora 4 2048 0" "llama-1b dora 4 2048 0" "llama-7b lora 2 2048 1" "llama-7b qlora 2 2048 1")
[[ $# -gt 0 ]] && plan=("$@")
MEMORY=1 bash scripts/gpu/bench-train.sh "${plan[@]}"
