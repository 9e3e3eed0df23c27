#!/usr/bin/env bash
# Sourced on the GPU machine (from the repo root) by run.sh, bench-train.sh and scripts/peft/check.sh: the .NET runtime
# from .gpu/, the published bundle unpacked from .gpu/publish.tar.xz (what travels; see prepare.sh), and the installed
# PyTorch's libtorch as the one libtorch of every process (LORAHUB_LIBTORCH; the bundle carries none of NuGet's).
eval "$(.gpu/setup-runtime.sh .gpu)"
# ASP.NET Core's shared framework beside the runtime (prepare.sh packs it; the host references it for `serve`).
if [[ -f .gpu/aspnet-runtime.tar.xz && ! -d "$DOTNET_ROOT/shared/Microsoft.AspNetCore.App" ]]; then
  tar -C "$DOTNET_ROOT" -xJf .gpu/aspnet-runtime.tar.xz
fi
# Unpacked again whenever the tarball changed: the GPU machine may keep an older .publish/ between runs.
if [[ -f .gpu/publish.tar.xz ]]; then
  sum=$(sha256sum .gpu/publish.tar.xz | cut -d' ' -f1)
  if [[ "$(cat .publish/.bundle 2>/dev/null)" != "$sum" ]]; then
    rm -rf .publish && tar -xJf .gpu/publish.tar.xz && echo "$sum" > .publish/.bundle
  fi
fi
: "${LIBTORCH:?no PyTorch found: setup-runtime.sh sets LIBTORCH from python3 -c "import torch"}"
export LORAHUB_LIBTORCH="$LIBTORCH/lib"
# A second guard for libLibTorchSharp.so's own dependencies; TorchRuntime has loaded them by absolute path already.
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if find .publish -name 'libtorch_cpu*' | grep -q .; then echo "gpu: NuGet's libtorch is in .publish; re-run scripts/gpu/prepare.sh" >&2; exit 1; fi
# xunit_cuda SUITE [CLASS | -method NAME | -option ...]: the published suite on CUDA through the console runner (the
# whole suite without filters; a bare CLASS is taken inside the suite's namespace). The GPU scripts' one way to run tests
# there (TIMEOUT seconds, default 120). xunit's console ANDs -class with -method filters: one call for each kind.
xunit_cuda() {
  local suite=$1; shift
  local args=()
  while (( $# )); do
    case $1 in
      -*) args+=("$1"); [[ $# -gt 1 && $2 != -* ]] && { args+=("$2"); shift; } ;;
      *.*) args+=(-class "$1") ;;
      *) args+=(-class "$suite.$1") ;;
    esac
    shift
  done
  (cd .publish/tests && LORAHUB_TEST_DEVICE=cuda timeout "${TIMEOUT:-120}" dotnet exec --roll-forward Major \
    --depsfile "$suite.deps.json" --runtimeconfig "$suite.runtimeconfig.json" ../xunit-runner/xunit.console.dll "$suite.dll" \
    "${args[@]}" -nocolor 2>&1)
}
