#!/usr/bin/env bash
# There (the GPU machine, from the repo root, after scripts/gpu/prepare.sh here): runs on the installed PyTorch's
# libtorch (CUDA) through LORAHUB_LIBTORCH — `loraHub info`, the main job on cuda, every published test suite with
# LORAHUB_TEST_DEVICE=cuda, then the per-op overhead and matmul benchmarks next to PyTorch eager.
# Output logs and JSON lines go to $OUT when set. SKIP_MAIN_JOB / SKIP_BINDING_BENCH skip those parts.
set -uo pipefail
eval "$(.gpu/setup-runtime.sh .gpu)"
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
: "${LIBTORCH:?no PyTorch found: setup-runtime.sh sets LIBTORCH from python3 -c "import torch"}"
# One libtorch in the process: PyTorch's. The bundle carries none of NuGet's (prepare.sh removed it); TorchRuntime loads
# this one by absolute path before TorchSharp starts, and the loader path is a second guard for libLibTorchSharp.so.
export LORAHUB_LIBTORCH="$LIBTORCH/lib" LORAHUB_TEST_DEVICE=cuda
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if find .publish -name 'libtorch_cpu*' | grep -q .; then echo "run: NuGet's libtorch is in .publish; re-run prepare.sh" >&2; exit 1; fi
host=(dotnet .publish/host/loraHub.dll)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda)'
"${host[@]}" info | tee "$out/info.txt"
grep -q "$LIBTORCH" "$out/info.txt" || echo "run: WARNING: loraHub info does not name $LIBTORCH as the loaded libtorch"
failed=0

if [[ -z "${SKIP_MAIN_JOB:-}" ]]; then
  echo "== main job (cuda)"
  start=$SECONDS
  "${host[@]}" run examples/finetune.csx 200 200 "$out/finetune-lora" > "$out/finetune.log" 2>&1 || failed=1
  echo "main job: $((SECONDS - start)) s (exit status ${failed})"; grep -E "exact match|trainable" "$out/finetune.log" | head -8
fi

for deps in .publish/tests/*.Tests.deps.json; do
  name=$(basename "$deps" .deps.json)
  echo "== $name (cuda)"
  (cd .publish/tests && dotnet exec --roll-forward Major --depsfile "$name.deps.json" --runtimeconfig "$name.runtimeconfig.json" \
     ../xunit-runner/xunit.console.dll "$name.dll" -nocolor 2>&1) > "$out/$name.log"
  [[ $? -eq 0 ]] || failed=1
  grep -E "Total:|\[FAIL\]" -A4 "$out/$name.log" | head -40
done

if [[ -d .publish/LoRAHub.Bench && -z "${SKIP_BINDING_BENCH:-}" ]]; then
  echo "== per-op overhead and matmul: TorchSharp (C#) vs PyTorch eager"
  for args in "matmul 8192 cuda:0" "matmul 4096 cpu" "tiny-op 200000 cuda:0" "tiny-op 200000 cpu" "ops 20000 cuda:0" "ops 20000 cpu"; do
    dotnet .publish/LoRAHub.Bench/LoRAHub.Bench.dll $args | tee -a "$out/bench.jsonl"
    python3 bench/torch_reference.py $args | tee -a "$out/bench.jsonl"
  done
fi
exit $failed
