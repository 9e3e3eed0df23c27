#!/usr/bin/env bash
# On a machine with PyTorch + transformers + peft (the GPU machine), after setup (host in artifacts/host):
# checks that our adapters load in PEFT with the same logits, and PEFT's load here with the same logits.
# Writes the PEFT-saved adapter to tests/LoRAHub.LoRA.Tests/fixtures/peft_adapter (committed, so CI checks it).
set -euo pipefail
cd "$(dirname "$0")/../.."
base=tests/LoRAHub.Models.Tests/fixtures/llama
work=$(mktemp -d)
host=(dotnet artifacts/host/loraHub.dll run)
"${host[@]}" scripts/peft/our_adapter.csx save "$base" "$work/ours"
python3 scripts/peft/check_peft.py "$base" "$work/ours" "$work/peft"
"${host[@]}" scripts/peft/our_adapter.csx check "$base" "$work/peft"
mkdir -p tests/LoRAHub.LoRA.Tests/fixtures && rm -rf tests/LoRAHub.LoRA.Tests/fixtures/peft_adapter
cp -r "$work/peft" tests/LoRAHub.LoRA.Tests/fixtures/peft_adapter
cp -r "$work/ours" "${OUT:-$work}/ours_adapter" 2>/dev/null || true
cp -r "$work/peft" "${OUT:-$work}/peft_adapter" 2>/dev/null || true
echo "PEFT interop: both directions match"
