#!/usr/bin/env bash
# There (GPU machine, after scripts/gpu/prepare.sh here): each speed piece of session 5 measured on its own, as
# bench/README.md's "pieces" table — llama-1b r16 4×2048, the default path against the same run with that one piece
# switched off (LoRA: the cross-entropy kernel, the RoPE + GQA-repeat kernel, the per-step loss read of the old bench;
# DoRA: the low-rank norm kernel; llama-7b QLoRA against LoRA, checkpointed, 2×2048), then a 50-step loss of the
# default path against all new kernels off (equal within bf16 noise). JSON lines in $OUT/pieces.jsonl. PIECES="LABEL ..."
# runs only those.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
bench() {   # bench LABEL "ENV=VAL ..." SHAPE METHOD BATCH SEQ CKPT STEPS
  local label=$1 envs=$2; shift 2
  [[ -n "${PIECES:-}" && " $PIECES " != *" $label "* ]] && return 0   # PIECES: only these labels
  env $envs dotnet .publish/tests/LoRAHub.Bench.dll train "$@" cuda:0 2>&1 | grep '^{' | tail -1 \
    | sed "s/^{/{\"piece\":\"$label\",/" | tee -a "$out/pieces.jsonl"
}
lora="llama-1b lora 4 2048 0"; dora="llama-1b dora 4 2048 0"
bench lora-default "X=1" $lora 12
bench lora-no-ce-kernel "LORAHUB_CE_KERNEL=0" $lora 12
bench lora-no-rope-gqa-kernel "LORAHUB_ROPE_GQA_KERNEL=0" $lora 12
bench lora-sync-every-step "LORAHUB_BENCH_SYNC=1" $lora 12
bench dora-default "X=1" $dora 12
bench lora-7b-ckpt "X=1" llama-7b lora 2 2048 1 8
bench qlora-7b-ckpt "X=1" llama-7b qlora 2 2048 1 8
bench dora-no-norm-kernel "LORAHUB_DORA_NORM_KERNEL=0" $dora 12
off="LORAHUB_CE_KERNEL=0 LORAHUB_ROPE_GQA_KERNEL=0"
bench lora-50-default "X=1" $lora 50
bench lora-50-new-kernels-off "$off" $lora 50
bench dora-50-default "X=1" $dora 50
bench dora-50-new-kernels-off "$off LORAHUB_DORA_NORM_KERNEL=0" $dora 50
