#!/usr/bin/env bash
# There (GPU machine, after scripts/gpu/prepare.sh here): the headline rows of bench/README.md in one run on one GPU —
# ours then the peer (transformers + PEFT, ../shared/bench/peer_bench.py copied to .gpu/) on the same shapes: LoRA r16
# llama-1b 4×2048, llama-7b 2×2048 with selective checkpointing below the peer's checkpointed peak (BUDGET, default
# 12.5GiB) and the peer with every layer checkpointed, DoRA llama-1b, QLoRA and LoRA llama-7b with every layer
# checkpointed; then 50-step losses of the fused default against the unfused path (LoRA and DoRA llama-1b).
# JSON lines (with a "label") in $OUT/headline.jsonl, then issue 19's targets against them (headline_check.py; exit
# status 1 where one is not met). EXTRA (lines of `b` arguments) adds runs at the end.
source scripts/gpu/env.sh
o=${OUT:-/tmp/lorahub-out}; mkdir -p $o
b() { local label=$1 envs=$2; shift 2; env $envs timeout 120 dotnet .publish/tests/LoRAHub.Bench.dll train "$@" cuda:0 2>&1 | grep '^{' | tail -1 | sed "s/^{/{\"label\":\"$label\",/" | tee -a $o/headline.jsonl | cut -c1-330; }
peer() { local label=$1; shift; timeout 150 python3 .gpu/peer_bench.py "$@" 2>&1 | grep '^{' | tail -1 | sed "s/^{/{\"label\":\"$label\",\"impl\":\"peer\",/" | tee -a $o/headline.jsonl | cut -c1-330; }
b lora-1b X=1 llama-1b lora 4 2048 0 20
peer peer-lora-1b llama-1b lora 4 2048 0
b lora-7b-budget LORAHUB_BENCH_CKPT_POLICY=budget:${BUDGET:-12.5GiB} llama-7b lora 2 2048 1 8
peer peer-lora-7b-ckpt llama-7b lora 2 2048 1
b dora-1b X=1 llama-1b dora 4 2048 0 20
b qlora-7b-ckpt X=1 llama-7b qlora 2 2048 1 8
b lora-7b-ckpt X=1 llama-7b lora 2 2048 1 8
off="LORAHUB_FUSED=0 LORAHUB_CE_KERNEL=0 LORAHUB_ROPE_GQA_KERNEL=0 LORAHUB_LORA_MLP_KERNEL=0 LORAHUB_LORA_ROWSCALE_KERNELS=0 LORAHUB_DORA_NORM_KERNEL=0 LORAHUB_LOWRANK_KERNEL=0 LORAHUB_RMSNORM_ROWS_KERNEL=0 LORAHUB_ADD_RMSNORM=0 LORAHUB_DORA_NORM_GROUPED=0 LORAHUB_SDPA_NATIVE_GQA=0"
b lora-50-fused X=1 llama-1b lora 4 2048 0 50
b lora-50-unfused "$off" llama-1b lora 4 2048 0 50
b dora-50-fused X=1 llama-1b dora 4 2048 0 50
b dora-50-unfused "$off" llama-1b dora 4 2048 0 50
# EXTRA: more `b LABEL "ENV=..." SHAPE METHOD BATCH SEQ CKPT STEPS` runs at the end (one per line).
while IFS= read -r line; do [[ -n "$line" ]] && eval "b $line"; done <<< "${EXTRA:-}"
python3 scripts/gpu/headline_check.py $o/headline.jsonl
