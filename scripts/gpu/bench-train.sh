#!/usr/bin/env bash
# There (GPU machine, after scripts/gpu/prepare.sh here): our training benchmark on the shapes of
# ../shared/bench/peer_bench.py (prepare.sh copies it to .gpu/), on the installed PyTorch's libtorch. Arguments: lines of "SHAPE METHOD BATCH SEQ CKPT"
# (default: the peer's plan plus QLoRA and GaLore).
#   PEER=1    runs peer_bench.py on the same configuration right after ours (ratios from one run on one GPU).
#   MEMORY=1  runs both under PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync, where our peak_gib
#             (torchx.cuda.max_memory_allocated: the CUDA pool's used-memory high-water mark) and the peer's
#             torch.cuda.max_memory_allocated measure the same thing. Speed figures come from runs without it.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
[[ -n "${MEMORY:-}" ]] && export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
log="$out/train-bench${MEMORY:+-memory}.jsonl"
plan=("llama-1b full 4 2048 0" "llama-1b lora 4 2048 0" "llama-1b dora 4 2048 0" "llama-1b lora 4 2048 1"
      "llama-7b lora 2 2048 1" "llama-7b dora 2 2048 1" "llama-7b qlora 2 2048 1" "llama-1b galore 4 2048 0")
[[ $# -gt 0 ]] && plan=("$@")
for p in "${plan[@]}"; do
  dotnet .publish/tests/LoRAHub.Bench.dll train $p 8 cuda:0 2>&1 | grep -v '^   at ' | tail -4 | tee -a "$log"
  read -r shape method _ <<< "$p"
  if [[ -n "${PEER:-}" && "$method" =~ ^(full|lora|dora)$ ]]; then
    python3 .gpu/peer_bench.py $p 2>&1 | grep '^{' | tail -1 | sed 's/^{/{"impl": "peer", /' | tee -a "$log"
  fi
done
