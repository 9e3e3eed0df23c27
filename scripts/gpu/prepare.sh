#!/usr/bin/env bash
# Here (the .NET machine): packs the .NET runtime and publishes the test suites and benchmarks into .publish/,
# so that scripts/gpu/run.sh can run them on the GPU machine, which has PyTorch and CUDA but no .NET SDK.
# Carry `.gpu` and `.publish` to the device run.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
../shared/gpu/pack-runtime.sh .gpu >/dev/null
rm -rf .publish && mkdir -p .publish/tests
# All suites go to one folder: they share their dependencies, which keeps the carried tree under 64 MiB.
# SUITES (names of tests/ folders) narrows the set; the Host suite needs the SDK and is left out by default.
for p in tests/*/*.Tests.csproj; do
  name=$(basename "$p" .csproj)
  [[ -n "${SUITES:-}" && " $SUITES " != *" $name "* ]] && continue
  [[ -z "${SUITES:-}" && "$name" == *Host* ]] && continue
  dotnet publish "$p" -c Release -o .publish/tests --nologo -v q >/dev/null
done
# Only linux-x64 is needed there; the coverage collector and other platforms' binaries would exceed the carry limit.
rm -rf .publish/tests/{CodeCoverage,alpine,arm64,macos,win-x64,win-x86,win-arm64,InstrumentationEngine}
for p in bench/*/*.csproj; do
  [[ -f "$p" ]] || continue
  dotnet publish "$p" -c Release -o ".publish/$(basename "$p" .csproj)" --nologo -v q >/dev/null
done
# The xunit console runner (netcoreapp2.0 build; runs on .NET 10 with roll-forward) for suites without the SDK.
runner=$(ls -d ~/.nuget/packages/xunit.runner.console/2.4.1/tools/netcoreapp2.0 2>/dev/null || true)
if [[ -z "$runner" ]]; then
  tmp=$(mktemp -d)
  printf '<Project Sdk="Microsoft.NET.Sdk"><PropertyGroup><TargetFramework>net10.0</TargetFramework></PropertyGroup><ItemGroup><PackageDownload Include="xunit.runner.console" Version="[2.4.1]" /></ItemGroup></Project>' > "$tmp/dl.csproj"
  dotnet restore "$tmp/dl.csproj" >/dev/null
  runner=$(ls -d ~/.nuget/packages/xunit.runner.console/2.4.1/tools/netcoreapp2.0)
fi
cp -r "$runner" .publish/xunit-runner
du -sh .gpu .publish
