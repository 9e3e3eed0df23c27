#!/usr/bin/env bash
# One idempotent setup for a fresh Debian 12 machine with the .NET SDK (run as root):
# installs libtorch + OpenBLAS + build tools when missing, builds the native shim and the solution,
# publishes the host with its plugins to artifacts/host, and installs the `dotnet loraHub` launcher.
# LIBTORCH=/path/to/torch (a PyTorch install's torch folder) builds against that libtorch instead (CUDA if it has it).
set -euo pipefail
cd "$(dirname "$0")"

missing=()
for pkg in libtorch-dev libopenblas0-pthread cmake g++ make; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [[ -z "${LIBTORCH:-}" && ${#missing[@]} -gt 0 ]]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

native/build.sh
dotnet build LoRAHub.sln -c Release --nologo -v q -clp:ErrorsOnly

# The host and its built-in plugins, laid out as users run them.
if [[ -f src/Host/LoRAHub.Host.csproj ]]; then
  dotnet publish src/Host/LoRAHub.Host.csproj -c Release -o artifacts/host --nologo -v q -clp:ErrorsOnly
  for plugin in plugins/*/; do
    proj=$(ls "$plugin"*.csproj 2>/dev/null | head -1) || true
    [[ -n "$proj" ]] || continue
    dotnet publish "$proj" -c Release -o "artifacts/host/plugins/$(basename "$plugin")" --nologo -v q -clp:ErrorsOnly
  done
  if [[ -w /usr/local/bin ]]; then
    ln -sf "$(pwd)/src/Host/dotnet-loraHub" /usr/local/bin/dotnet-loraHub
  fi
fi
echo "setup: done (libtorch $(grep -h 'define TORCH_VERSION_M' "${LIBTORCH:-/usr}/include/torch/csrc/api/include/torch/version.h" 2>/dev/null | awk '{printf "%s%s", sep, $3; sep="."}'))"
