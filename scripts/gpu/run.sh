#!/usr/bin/env bash
# There (the GPU machine, from the repo root, after scripts/gpu/prepare.sh here): runs on the installed PyTorch's
# libtorch (CUDA) through LORAHUB_LIBTORCH — `loraHub info`, the main job on cuda, every published test suite with
# LORAHUB_TEST_DEVICE=cuda, then the per-op overhead and matmul benchmarks next to PyTorch eager.
# Output logs and JSON lines go to $OUT when set. SKIP_MAIN_JOB / SKIP_BINDING_BENCH skip those parts.
set -uo pipefail
source scripts/gpu/env.sh
export LORAHUB_TEST_DEVICE=cuda
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
host=(dotnet .publish/host/loraHub.dll)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda)'
"${host[@]}" info | tee "$out/info.txt"
grep -q "$LIBTORCH" "$out/info.txt" || echo "run: WARNING: loraHub info does not name $LIBTORCH as the loaded libtorch"
failed=0

if [[ -z "${SKIP_MAIN_JOB:-}" ]]; then
  echo "== main job (cuda)"
  start=$SECONDS; job=/tmp/lorahub-main; rm -rf "$job"
  "${host[@]}" run examples/finetune.csx 200 200 "$job" > "$out/finetune.log" 2>&1 || failed=1
  echo "main job: $((SECONDS - start)) s (exit status ${failed})"; grep -E "exact match|trainable|trained" "$out/finetune.log" | head -8
  # The small results only: checkpoints and the merged model stay there.
  mkdir -p "$out/finetune-lora" && cp "$job"/{result.json,metrics.jsonl,loss.svg} "$out/finetune-lora/" 2>/dev/null
fi

for deps in .publish/tests/*.Tests.deps.json; do
  name=$(basename "$deps" .deps.json)
  [[ -n "${RUN_SUITES:-}" && " $RUN_SUITES " != *" $name "* ]] && continue   # RUN_SUITES: only these suites
  echo "== $name (cuda)"
  (cd .publish/tests && dotnet exec --roll-forward Major --depsfile "$name.deps.json" --runtimeconfig "$name.runtimeconfig.json" \
     ../xunit-runner/xunit.console.dll "$name.dll" -nocolor 2>&1) > "$out/$name.log"
  [[ $? -eq 0 ]] || failed=1
  grep -E "Total:|\[FAIL\]" -A4 "$out/$name.log" | head -40
done

if [[ -f .publish/tests/LoRAHub.Bench.dll && -z "${SKIP_BINDING_BENCH:-}" ]]; then
  echo "== per-op overhead and matmul: TorchSharp (C#) vs PyTorch eager"
  for args in "matmul 8192 cuda:0" "matmul 4096 cpu" "tiny-op 200000 cuda:0" "tiny-op 200000 cpu" "ops 20000 cuda:0" "ops 20000 cpu"; do
    dotnet .publish/tests/LoRAHub.Bench.dll $args | tee -a "$out/bench.jsonl"
    python3 bench/torch_reference.py $args | tee -a "$out/bench.jsonl"
  done
fi
exit $failed
