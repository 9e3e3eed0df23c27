#!/usr/bin/env bash
# On a machine with PyTorch + transformers + peft: the GPU machine after scripts/gpu/prepare.sh (host in .publish/host,
# run on the installed PyTorch's libtorch through LORAHUB_LIBTORCH), or a machine after setup.sh (host in artifacts/host):
# checks, for LoRA, DoRA and AdaLoRA, that our adapters load in PEFT with the same logits and PEFT's load here with the same
# logits. Writes the PEFT-saved adapters to tests/LoRAHub.{LoRA,DoRA,AdaLoRA}.Tests/fixtures/peft_adapter (committed, so CI
# checks them without Python) and, when $OUT is set, copies them there.
set -euo pipefail
cd "$(dirname "$0")/../.."
base=tests/LoRAHub.Models.Tests/fixtures/llama
if [[ -f artifacts/host/loraHub.dll ]]; then
  host=(dotnet artifacts/host/loraHub.dll run)
else
  source scripts/gpu/env.sh   # the GPU machine: the bundle from scripts/gpu/prepare.sh, on PyTorch's libtorch
  host=(dotnet .publish/host/loraHub.dll run)
fi
for method in ${METHODS:-lora dora adalora}; do
  work=$(mktemp -d)
  "${host[@]}" scripts/peft/our_adapter.csx save "$base" "$work/ours" "$method"
  python3 scripts/peft/check_peft.py "$base" "$work/ours" "$work/peft" "$method"
  "${host[@]}" scripts/peft/our_adapter.csx check "$base" "$work/peft" "$method"
  case "$method" in lora) suite=tests/LoRAHub.LoRA.Tests ;; dora) suite=tests/LoRAHub.DoRA.Tests ;; adalora) suite=tests/LoRAHub.AdaLoRA.Tests ;; esac
  mkdir -p "$suite/fixtures" && rm -rf "$suite/fixtures/peft_adapter"
  cp -r "$work/peft" "$suite/fixtures/peft_adapter"
  if [[ -n "${OUT:-}" ]]; then cp -r "$work/peft" "$OUT/peft_${method}_adapter"; fi
  echo "PEFT interop ($method): both directions match"
done
# The full matrix (issue 17): LoRA and DoRA on Llama, Qwen2, Mistral (sliding window) and GPT-2 over every setting PEFT
# saves, both directions, plus merged folders in transformers. MATRIX=0 skips it.
if [[ "${MATRIX:-1}" != 0 ]]; then scripts/peft/check_matrix.sh; fi
