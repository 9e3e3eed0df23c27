#!/usr/bin/env bash
# Here (the .NET machine): packs the .NET runtime into .gpu/ and publishes, framework-dependent for linux-x64, into
# .publish/ (ignored): the host with its plugins (.publish/host), the test suites and the benchmark (.publish/tests,
# one folder: they share TorchSharp and the libraries) and the xunit console runner, so that scripts/gpu/run.sh can run
# them on the GPU machine, which has PyTorch (CUDA) but no .NET. .publish/ is also packed into .gpu/publish.tar.xz:
# carry `.gpu` alone to the device run (scripts/gpu/env.sh unpacks it there).
# The bundle holds no libtorch: there, TorchSharp runs on the installed PyTorch's torch/lib (LORAHUB_LIBTORCH), and
# NuGet's CPU libtorch (480 MB) could not travel anyway (the device tool carries at most 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
../shared/gpu/pack-runtime.sh .gpu >/dev/null
# The carry limit (64 MiB with the tree) is tight: repack the runtime once without the debugger libraries (createdump,
# libmscordaccore, libmscordbi: 4 MB nobody uses there) at xz -9e, about 2 MB less.
if [[ ! -f .gpu/.runtime-slim ]]; then
  tmp=$(mktemp -d); tar -C "$tmp" -xJf .gpu/dotnet-runtime.tar.xz
  find "$tmp" \( -name libmscordaccore.so -o -name libmscordbi.so -o -name createdump \) -delete
  tar -C "$tmp" -cf - . | xz -9e -T2 > .gpu/dotnet-runtime.tar.xz; rm -rf "$tmp"; touch .gpu/.runtime-slim
fi
cp -f ../shared/bench/peer_bench.py ../shared/bench/peer_ddp.py .gpu/   # the peer baselines (shared/ may not travel)
# pack-runtime.sh packs Microsoft.NETCore.App only; the host also needs ASP.NET Core's shared framework (`serve`).
dotnet_root="$(dirname "$(readlink -f "$(command -v dotnet)")")"
[[ -f .gpu/aspnet-runtime.tar.xz ]] || tar -C "$dotnet_root" -cJf .gpu/aspnet-runtime.tar.xz shared/Microsoft.AspNetCore.App
rm -rf .publish && mkdir -p .publish/tests
publish() { dotnet publish "$1" -c Release -r linux-x64 --self-contained false -o "$2" --nologo -v q -clp:ErrorsOnly; }

publish src/Host/LoRAHub.Host.csproj .publish/host
for plugin in plugins/*/; do
  proj=$(ls "$plugin"*.csproj 2>/dev/null | head -1) || true
  [[ -n "$proj" ]] && publish "$proj" ".publish/host/plugins/$(basename "$plugin")"
done
# The out-of-tree KaSA sample (a LoRA variant built against the published host, as a third party would) for
# scripts/peft/check_variant.sh.
dotnet publish samples/KasaVariant/KasaVariant.csproj -c Release -p:LoRAHubHome="$PWD/.publish/host" \
  -o .publish/plugins/KasaVariant --nologo -v q -clp:ErrorsOnly >/dev/null
# All suites and the benchmark go to one folder: they share their dependencies, which keeps the carried tree small.
# SUITES (names of tests/ folders) narrows the set; the Host suite builds plugins with the SDK and is left out by
# default (run.sh runs the host itself: `info` and the main job).
for p in tests/*/*.Tests.csproj; do
  name=$(basename "$p" .csproj)
  [[ -n "${SUITES:-}" && " $SUITES " != *" $name "* ]] && continue
  [[ -z "${SUITES:-}" && "$name" == *Host* ]] && continue
  publish "$p" .publish/tests
done
for p in bench/*/*.csproj; do
  [[ -f "$p" ]] && publish "$p" .publish/tests
done

# NuGet's libtorch (and what only it needs) out of every folder; libLibTorchSharp.so, TorchSharp's own glue, stays.
find .publish \( -name 'libtorch*' -o -name 'libc10*' -o -name 'libgomp*' -o -name 'libshm.so' -o -name 'libaoti_custom_ops.so' \
  -o -name 'libbackend_with_compiler.so' -o -name 'libjitbackend_test.so' -o -name 'libnnapi_backend.so' \) -delete
# The host's `new` scaffolding (a copy of examples/ with the base model, 13 MB) is not needed there: the repo travels.
rm -rf .publish/host/scaffold .publish/tests/scaffold
# The coverage collector and other platforms' binaries are not needed there.
find .publish -depth -type d \( -name CodeCoverage -o -name InstrumentationEngine -o -name alpine -o -name arm64 -o -name macos \
  -o -name 'win-*' -o -name 'osx*' \) -exec rm -rf {} +

# The xunit console runner (netcoreapp2.0 build; runs on .NET 10 with roll-forward) for suites without the SDK.
runner=$(ls -d ~/.nuget/packages/xunit.runner.console/2.4.1/tools/netcoreapp2.0 2>/dev/null || true)
if [[ -z "$runner" ]]; then
  tmp=$(mktemp -d)
  printf '<Project Sdk="Microsoft.NET.Sdk"><PropertyGroup><TargetFramework>net10.0</TargetFramework></PropertyGroup><ItemGroup><PackageDownload Include="xunit.runner.console" Version="[2.4.1]" /></ItemGroup></Project>' > "$tmp/dl.csproj"
  dotnet restore "$tmp/dl.csproj" >/dev/null
  runner=$(ls -d ~/.nuget/packages/xunit.runner.console/2.4.1/tools/netcoreapp2.0)
fi
cp -r "$runner" .publish/xunit-runner

if find .publish -name 'libtorch_cpu*' | grep -q .; then echo "prepare: NuGet's libtorch is still in .publish" >&2; exit 1; fi
# The device tool carries at most 64 MiB; the bundle travels compressed (DLLs and .so files shrink about 4x).
rm -f .gpu/publish.tar.xz
tar -cf - .publish | xz -T0 -6 > .gpu/publish.tar.xz
sha256sum .gpu/publish.tar.xz | cut -d' ' -f1 > .publish/.bundle   # env.sh: this .publish/ is that tarball
du -sm -l .publish/* | sed 's/^/prepare: MiB unpacked /'
ls -l .gpu | sed 's/^/prepare: /'
total=$(du -sm -l .gpu | cut -f1)
echo "prepare: carry .gpu = ${total} MiB"
if (( total > 64 )); then echo "prepare: .gpu = ${total} MiB, over the device tool's 64 MiB carry limit" >&2; exit 1; fi
