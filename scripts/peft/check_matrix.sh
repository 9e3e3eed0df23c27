#!/usr/bin/env bash
# The PEFT interop matrix (scripts/peft/interop_matrix.py): LoRA and DoRA on Llama, Qwen2, Mistral (sliding window 4), a
# tied Llama and GPT-2 over patterns, rsLoRA, layers_to_transform, bias modes, lora_bias, modules_to_save (also lm_head on
# tied models), trainable_token_indices and every init PEFT can save (loftq where bitsandbytes is installed), both
# directions, plus our merged folders in transformers. A failing case is reported and the run goes on; exit 1 at the end. Needs Python with torch, transformers and peft:
#  - the GPU machine after scripts/gpu/prepare.sh (host in .publish/host, on the installed PyTorch's libtorch), or
#  - a machine after setup.sh (host in artifacts/host).
# Writes the JSON lines to $OUT/peft_matrix.jsonl when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -f artifacts/host/loraHub.dll ]]; then
  export LORAHUB_HOST="dotnet artifacts/host/loraHub.dll run"
else
  source scripts/gpu/env.sh
  export LORAHUB_HOST="dotnet .publish/host/loraHub.dll run"
fi
work=$(mktemp -d)
if [[ -n "${OUT:-}" ]]; then
  python3 scripts/peft/interop_matrix.py "$work" | tee "$OUT/peft_matrix.jsonl"
else
  python3 scripts/peft/interop_matrix.py "$work"
fi
