#!/usr/bin/env bash
# PEFT interop for the KaSA sample (samples/KasaVariant, a LoRA variant built out of tree): our saved adapter loads in
# PEFT with the same logits, and PEFT's loads here with the same logits. Needs Python with torch, transformers and a PEFT
# that has KaSA (LoraConfig.kasa_config).
#  - With a .NET SDK and artifacts/host (after setup.sh): builds the sample against artifacts/host into a temp plugin folder.
#  - On the GPU machine (no SDK): uses the bundle of scripts/gpu/prepare.sh, which must hold the sample published to
#    .publish/plugins/KasaVariant (see samples/KasaVariant/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
base=tests/LoRAHub.Models.Tests/fixtures/llama
if [[ -f artifacts/host/loraHub.dll ]] && dotnet --list-sdks 2>/dev/null | grep -q .; then
  host=(dotnet artifacts/host/loraHub.dll run)
  plugins=$(mktemp -d)
  dotnet build samples/KasaVariant/KasaVariant.csproj -c Release -p:LoRAHubHome="$PWD/artifacts/host" -o "$plugins/KasaVariant" \
    --nologo -v q -clp:ErrorsOnly
else
  source scripts/gpu/env.sh
  host=(dotnet .publish/host/loraHub.dll run)
  plugins=$PWD/.publish/plugins
  if [[ ! -f "$plugins/KasaVariant/KasaVariant.dll" ]]; then
    echo "check_variant: no $plugins/KasaVariant/KasaVariant.dll; publish the sample into the bundle (samples/KasaVariant/README.md)" >&2
    exit 1
  fi
fi
export LORAHUB_PLUGIN_PATH=$plugins
if ! python3 -c "from peft import KasaConfig" 2>/dev/null; then
  echo "check_variant: PEFT $(python3 -c 'import peft; print(peft.__version__)' 2>/dev/null || echo '(not installed)') has no KaSA (kasa_config); nothing checked" >&2
  exit 2
fi
work=$(mktemp -d)
"${host[@]}" scripts/peft/kasa_adapter.csx save "$base" "$work/ours"
python3 scripts/peft/check_variant.py "$base" "$work/ours" "$work/peft"
"${host[@]}" scripts/peft/kasa_adapter.csx check "$base" "$work/peft"
if [[ -n "${OUT:-}" ]]; then cp -r "$work/peft" "$OUT/peft_kasa_adapter"; fi
echo "PEFT interop (kasa): both directions match"
