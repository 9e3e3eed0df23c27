#!/usr/bin/env bash
# PEFT interop for multi-head-aware LoRA ("headlora", plugins/HeadLoRA): our host attaches headlora on the tiny Llama
# fixture (fixed uneven per-head ranks, and the adaptive budget after a few steps), exports each in PEFT's LoRA format,
# and Python PEFT loads them on the same base with our logits (fp32, 1e-4). PEFT has no head-aware LoRA, so the check is
# one way: our export in PEFT. Needs Python with torch, transformers and peft.
#  - With artifacts/host (after setup.sh): that host and its plugins.
#  - On the GPU machine: the bundle of scripts/gpu/prepare.sh (host in .publish/host, plugins/HeadLoRA published with it).
set -euo pipefail
cd "$(dirname "$0")/../.."
base=tests/LoRAHub.Models.Tests/fixtures/llama
if [[ -f artifacts/host/loraHub.dll ]]; then
  host=(dotnet artifacts/host/loraHub.dll run)
else
  source scripts/gpu/env.sh
  host=(dotnet .publish/host/loraHub.dll run)
fi
work=$(mktemp -d)
"${host[@]}" scripts/peft/headlora_adapter.csx "$base" "$work"
python3 scripts/peft/check_headlora.py "$base" "$work/fixed" "$work/adaptive"
if [[ -n "${OUT:-}" ]]; then cp -r "$work/fixed" "$OUT/headlora_fixed_as_peft_lora"; cp -r "$work/adaptive" "$OUT/headlora_adaptive_as_peft_lora"; fi
echo "PEFT interop (headlora): both exports match"
