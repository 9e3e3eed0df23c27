#!/usr/bin/env bash
# There (kind nvidia-h200-x2, after scripts/gpu/prepare.sh here): METHOD (default full fine-tuning; or lora) llama-1b
# 4×2048 per GPU on 1 GPU and on 2 GPUs with the gradient bucket sizes of BUCKETS (MB; default "25 100") and the settings
# of NCCL_VARIANTS (";"-separated env assignments, e.g. "NCCL_MAX_NCHANNELS=8" or "LORAHUB_DDP_SPARSE_EMBEDDING=1"),
# overlap on: which setting scales best. JSON to $OUT/ddp-buckets.jsonl.
set -uo pipefail
source scripts/gpu/env.sh
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"; log="$out/ddp-buckets.jsonl"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
port=29600
one() { port=$((port + 1)); env "$@" MASTER_PORT=$port "${bench[@]}" --nproc-per-node ${N} train llama-1b ${METHOD:-full} 4 2048 0 ${STEPS:-5} 2>/dev/null | grep '^{' | tail -1 \
  | sed "s/^{/{\"setting\": \"$*\", /" | tee -a "$log"; }
N=1 one LORAHUB_BENCH_BUCKET_MB=25
for mb in ${BUCKETS:-25 100}; do N=2 one LORAHUB_BENCH_BUCKET_MB=$mb; done
IFS=';' read -ra variants <<< "${NCCL_VARIANTS:-NCCL_MAX_NCHANNELS=8}"
for v in "${variants[@]}"; do N=2 one LORAHUB_BENCH_BUCKET_MB=25 $v; done
