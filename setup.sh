#!/usr/bin/env bash
# One idempotent setup for a machine with the .NET SDK: builds the solution, publishes the host with its plugins to
# artifacts/host, packs the host as a .NET tool (LoRAHub.Tool, command dotnet-loraHub, plugins inside) into the folder
# feed artifacts/feed, and installs it through the repository's local tool manifest (.config/dotnet-tools.json +
# `dotnet tool restore`), so that `dotnet loraHub` works anywhere under this checkout with no PATH change.
# For a global install instead: dotnet tool install -g LoRAHub.Tool --add-source artifacts/feed (docs/cli.md).
# Only MPICH comes from apt (when missing) and no C++ is compiled: TorchSharp and NuGet's CPU libtorch (libtorch-cpu-linux-x64)
# come with the restore and travel inside the tool (runtimes/linux-x64/native). For CUDA at run time, point
# LORAHUB_LIBTORCH at an installed PyTorch's torch/lib (see README); nothing here changes for it.
set -euo pipefail
cd "$(dirname "$0")"

# MPICH for the CPU data-parallel backend (`run --nproc-per-node`, docs/distributed.md) and its tests: on Debian/Ubuntu
# when MPICH's launcher (mpiexec.mpich or mpiexec.hydra) is missing — another MPI's mpiexec does not count —, as root or through sudo; elsewhere (or without apt) skipped with a note, nothing else needs it.
if ! command -v mpiexec.mpich >/dev/null && ! command -v mpiexec.hydra >/dev/null && command -v apt-get >/dev/null; then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo -n"
  if ! { $sudo apt-get install -y --no-install-recommends mpich libmpich-dev >/dev/null 2>&1 ||
         { $sudo apt-get update >/dev/null 2>&1 && $sudo apt-get install -y --no-install-recommends mpich libmpich-dev >/dev/null 2>&1; }; }; then
    echo "setup: note: could not install mpich (apt-get); CPU data-parallel runs need it (docs/distributed.md)" >&2
  fi
fi

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
# Loads TorchSharp and libtorch once: a host that cannot (e.g. a libstdc++ too old for libLibTorchSharp.so) fails here.
dotnet artifacts/host/loraHub.dll info | sed 's/^/setup: /'

# The tool package, with the published plugins inside (tools/net10.0/any/plugins/<Name>/). About 170 MB: libtorch.
# Each checkout packs its own prerelease version (the hash of its path): the NuGet cache unpacks a tool once per
# version, so checkouts sharing one version would all run whichever set up last.
version="$(dotnet msbuild src/Host/LoRAHub.Host.csproj -getProperty:Version -p:Configuration=Release)-dev.$(printf %s "$PWD" | sha256sum | cut -c1-8)"
rm -rf artifacts/feed
dotnet pack src/Host/LoRAHub.Host.csproj -c Release --no-build -p:ToolPluginsDir="$PWD/artifacts/host/plugins" \
  -p:PackageVersion="$version" -o artifacts/feed --nologo -v q -clp:ErrorsOnly

# Local tool manifest at the repository root (written here, not tracked: its version is this checkout's); the restore
# unpacks the package into the NuGet packages folder. The version stays the same between rebuilds of a checkout, so
# the unpacked copy of an earlier setup is removed first.
mkdir -p .config
cat > .config/dotnet-tools.json <<JSON
{
  "version": 1,
  "isRoot": true,
  "tools": {
    "lorahub.tool": {
      "version": "$version",
      "commands": [ "dotnet-loraHub" ],
      "rollForward": false
    }
  }
}
JSON
rm -rf "${NUGET_PACKAGES:-$HOME/.nuget/packages}/lorahub.tool/$version"
dotnet tool restore --add-source artifacts/feed >/dev/null
# Earlier setups linked a launcher script into /usr/local/bin; it is gone (the tool replaces it).
if [[ -L /usr/local/bin/dotnet-loraHub && "$(readlink /usr/local/bin/dotnet-loraHub)" == */src/Host/dotnet-loraHub ]]; then
  rm -f /usr/local/bin/dotnet-loraHub
fi
echo "setup: $version installed as a local tool: dotnet loraHub (host in artifacts/host, $(ls -d artifacts/host/plugins/*/ | wc -l) plugins, package in artifacts/feed)"
