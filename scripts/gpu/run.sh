#!/usr/bin/env bash
# There (the GPU machine, from the repo root, after scripts/gpu/prepare.sh here):
# builds the shim against the installed PyTorch's libtorch (CUDA), runs every test suite on cuda,
# then the binding benchmarks next to PyTorch eager. Output JSON lines and logs go to $OUT when set.
set -uo pipefail
eval "$(.gpu/setup-runtime.sh .gpu)"
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
LH_NATIVE_BUILD_DIR=/tmp/lh-native native/build.sh > "$out/native-build.log" 2>&1 || { tail -30 "$out/native-build.log"; exit 1; }
export LORAHUB_NATIVE=/tmp/lh-native/liblorahub_native.so LORAHUB_TEST_DEVICE=cuda
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda)'
for deps in .publish/tests/*.Tests.deps.json; do
  name=$(basename "$deps" .deps.json)
  echo "== $name (cuda)"
  (cd .publish/tests && dotnet exec --roll-forward Major --depsfile "$name.deps.json" --runtimeconfig "$name.runtimeconfig.json" \
     ../xunit-runner/xunit.console.dll "$name.dll" -nocolor 2>&1) | tee "$out/$name.log" | grep -E "Total:|\[FAIL\]" -A4 | head -40
done
if [[ -d .publish/LoRAHub.Bench && -z "${SKIP_BINDING_BENCH:-}" ]]; then
  echo "== binding benchmarks"
  for args in "matmul 8192" "tiny-op 200000"; do
    dotnet .publish/LoRAHub.Bench/LoRAHub.Bench.dll $args cuda:0 | tee -a "$out/bench.jsonl"
    python3 bench/torch_reference.py $args cuda:0 | tee -a "$out/bench.jsonl"
    dotnet .publish/LoRAHub.Bench/LoRAHub.Bench.dll $args cpu | tee -a "$out/bench.jsonl"
    python3 bench/torch_reference.py $args cpu | tee -a "$out/bench.jsonl"
  done
fi
