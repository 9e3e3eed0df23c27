#!/usr/bin/env bash
# One idempotent setup for a machine with the .NET SDK: builds the solution, publishes the host with its plugins to
# artifacts/host, and installs the `dotnet loraHub` launcher. Nothing is installed with apt-get and no C++ is compiled:
# TorchSharp and NuGet's CPU libtorch (libtorch-cpu-linux-x64) come with the restore, and the published host carries
# them in artifacts/host/runtimes/linux-x64/native. For CUDA at run time, point LORAHUB_LIBTORCH at an installed
# PyTorch's torch/lib (see README); nothing here changes for it.
set -euo pipefail
cd "$(dirname "$0")"

dotnet build LoRAHub.sln -c Release --nologo -v q -clp:ErrorsOnly

# The host and its built-in plugins, laid out as users run them. Published from the build above (--no-build); a fresh
# folder each time so that a plugin removed from the repo does not linger. Plugins carry no TorchSharp or libtorch:
# the host provides both (a host test checks the folders).
rm -rf artifacts/host
dotnet publish src/Host/LoRAHub.Host.csproj -c Release --no-build -o artifacts/host --nologo -v q -clp:ErrorsOnly
for plugin in plugins/*/; do
  proj=$(ls "$plugin"*.csproj 2>/dev/null | head -1) || true
  [[ -n "$proj" ]] || continue
  dotnet publish "$proj" -c Release --no-build -o "artifacts/host/plugins/$(basename "$plugin")" --nologo -v q -clp:ErrorsOnly
done
if [[ -w /usr/local/bin ]]; then
  ln -sf "$(pwd)/src/Host/dotnet-loraHub" /usr/local/bin/dotnet-loraHub
fi
# Loads TorchSharp and libtorch once: a host that cannot (e.g. a libstdc++ too old for libLibTorchSharp.so) fails here.
dotnet artifacts/host/loraHub.dll info | sed 's/^/setup: /'
echo "setup: done (host in artifacts/host, $(ls -d artifacts/host/plugins/*/ | wc -l) plugins)"
