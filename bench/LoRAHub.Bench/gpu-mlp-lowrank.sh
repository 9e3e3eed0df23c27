#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, the LoRA MLP's low-rank updates
# inside the activation kernels (src/TorchExtensions/FusedOps/LoraMlpKernels.cs). About 100 s (DORA=1: +50 s):
#   1. Their tests on CUDA: LoraMlpKernelTests (kernels vs the composite MLP: outputs and gradients of x, A's, B's; fp32,
#      bf16, fp16; ranks 0..64, odd widths, 4-bit bases, row-scaled down), LoraFusionTests (the fused blocks incl. DoRA's
#      row-scaled path), FusedLoraBlockTests (Llama with LoRA on all projections, training losses fused = composite),
#      FusedDoraBlockTests (DoRA's fused blocks: gate/up row scales now go through these kernels).
#   2. llama-1b LoRA r16 4×2048, 8 timed steps: LORAHUB_LORA_MLP_KERNEL=0 (the addmm passes, as before) vs 1 (default).
#   DORA=1 adds llama-1b DoRA 4×2048, 8 steps: gate/up row scales in these kernels too (LORAHUB_LORA_MLP_KERNEL_DORA=1)
#   (the default) vs the row-scale SwiGLU kernels + addmm passes (=0) (+~50 s).
#   TILES=1 adds runs with other register tiles (LORAHUB_LORA_MLP_TILE="fwd,bwd" tokens per thread, default 4,2: 2,2).
#   LOSS=1 adds 50 steps each way under cudaMallocAsync: loss after the run (same seed: equal within bf16 noise), peak.
#   PROFILE=1 adds one ncu-profiled step with the kernels on ($OUT/ncu-mlp-lowrank.csv, the MLP kernels' durations).
# Output: $OUT/mlp-lowrank.jsonl, $OUT/mlp-lowrank-tests.log.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
log="$out/mlp-lowrank.jsonl"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
start=$SECONDS

tests() { # suite, classes...
  local suite=$1; shift
  local args=(); for c in "$@"; do args+=(-class "$suite.$c"); done
  (cd .publish/tests && LORAHUB_TEST_DEVICE=cuda timeout 150 dotnet exec --roll-forward Major --depsfile "$suite.deps.json" \
    --runtimeconfig "$suite.runtimeconfig.json" ../xunit-runner/xunit.console.dll "$suite.dll" "${args[@]}" -nocolor 2>&1)
}
{ tests LoRAHub.TorchExtensions.Tests LoraMlpKernelTests LoraFusionTests
  tests LoRAHub.LoRA.Tests FusedLoraBlockTests
  tests LoRAHub.DoRA.Tests FusedDoraBlockTests; } > "$out/mlp-lowrank-tests.log"
grep -E "Total:|\[FAIL\]|did not compile" -A4 "$out/mlp-lowrank-tests.log" | head -40
echo "tests: $((SECONDS - start)) s"

run() { # label, env..., -- bench args
  local label=$1; shift
  local envs=(); while [[ $1 != -- ]]; do envs+=("$1"); shift; done; shift
  echo "== $label" | tee -a "$log"
  env "${envs[@]}" timeout 150 "${bench[@]}" "$@" 2>&1 | grep -v '^   at ' | grep -E '^\{|LoRAHub:|rror' | tail -3 | tee -a "$log"
}
for k in 0 1; do run "kernel=$k" LORAHUB_LORA_MLP_KERNEL=$k -- train llama-1b lora 4 2048 0 8 cuda:0; done
if [[ -n "${DORA:-}" ]]; then
  for k in 0 1; do run "dora fold=$k" LORAHUB_LORA_MLP_KERNEL_DORA=$k -- train llama-1b dora 4 2048 0 8 cuda:0; done
fi
if [[ -n "${TILES:-}" ]]; then
  for t in 2,2; do run "kernel=1 tile=$t" LORAHUB_LORA_MLP_KERNEL=1 LORAHUB_LORA_MLP_TILE=$t -- train llama-1b lora 4 2048 0 8 cuda:0; done
fi
echo "speed runs: $((SECONDS - start)) s"
if [[ -n "${LOSS:-}" ]]; then
  for k in 0 1; do
    run "kernel=$k 50 steps" PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync LORAHUB_LORA_MLP_KERNEL=$k -- train llama-1b lora 4 2048 0 50 cuda:0
  done
fi
if [[ -n "${PROFILE:-}" ]]; then
  LORAHUB_BENCH_PROFILE_STEP=1 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
    --log-file "$out/ncu-mlp-lowrank.csv" "${bench[@]}" train llama-1b lora 4 2048 0 3 cuda:0 2>&1 | grep -v '^==PROF==' | tail -2
  python3 scripts/gpu/ncu_summary.py "$out/ncu-mlp-lowrank.csv" > "$out/ncu-mlp-lowrank.txt" 2>&1
  grep -E "kernels|lh_lora_mlp|lh_swiglu|badd" "$out/ncu-mlp-lowrank.txt" | head -12
fi

# One line per run: label, step ms, tok/s, peak GiB, loss, MLP paths.
python3 - "$log" <<'EOF'
import json, sys
label = ""
for line in open(sys.argv[1]):
    if line.startswith("== "): label = line[3:].strip(); continue
    if not line.startswith("{"): continue
    d = json.loads(line)
    print(f'{label}: {d.get("step_ms")} ms, {d.get("tokens_per_s")} tok/s, peak {d.get("peak_gib")} GiB, loss {d.get("loss")} | {d.get("paths")}')
EOF
echo "total: $((SECONDS - start)) s"
