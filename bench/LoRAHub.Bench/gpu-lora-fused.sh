#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19 items 1 and 6, the fused LoRA
# MLP and q/k/v blocks. About 4 minutes:
#   1. Their tests on CUDA (fused vs composite outputs and gradients, fp32 and bf16; paths taken/refused; training losses).
#   2. llama-1b LoRA r16 4×2048, 8 timed steps, default allocator: step ms, tok/s with the LoRA blocks composite (the
#      other kernels on, as before this change), + lora_mlp, + lora_qkv, both (the new default).
#   3. 50 timed steps (+3 warm-up) composite vs both fused under PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync: the
#      loss after the run (same seed: equal within bf16 noise) and peak memory (the pool's high-water mark, as
#      bench-train.sh MEMORY=1).
#   CKPT=1 adds llama-7b LoRA r16 2×2048 with checkpointing, composite vs fused (+~90 s).
#   QLORA=1 adds llama-7b QLoRA r16 2×2048 with checkpointing (4-bit bases dequantized inside the fused blocks), composite
#   vs fused (+~3 min: each run quantizes the model layer by layer first).
# Every JSON line carries "fused" (the LORAHUB_FUSED setting) and "paths" (which path each block took, and why not fused).
# Output: $OUT/lora-fused.jsonl, $OUT/lora-fused-tests.log.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
log="$out/lora-fused.jsonl"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
base="rmsnorm,swiglu,rope,dora,doranorm"
run() { LORAHUB_FUSED="$1" timeout "$2" "${bench[@]}" "${@:3}" 2>&1 | grep -v '^   at ' | tail -3 | tee -a "$log"; }
start=$SECONDS

tests() { TIMEOUT=150 xunit_cuda "$@"; } # suite, class
{ tests LoRAHub.TorchExtensions.Tests LoRAHub.TorchExtensions.Tests.LoraFusionTests
  tests LoRAHub.LoRA.Tests LoRAHub.LoRA.Tests.FusedLoraBlockTests; } > "$out/lora-fused-tests.log"
grep -E "Total:|\[FAIL\]" -A4 "$out/lora-fused-tests.log" | head -30
echo "tests: $((SECONDS - start)) s"

for f in "$base" "$base,lora_mlp" "$base,lora_qkv" "$base,lora_mlp,lora_qkv"; do
  run "$f" 120 train llama-1b lora 4 2048 0 8 cuda:0
done
echo "speed runs: $((SECONDS - start)) s"

export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
for f in "$base" "$base,lora_mlp,lora_qkv"; do
  run "$f" 150 train llama-1b lora 4 2048 0 50 cuda:0
done
echo "50-step loss and memory runs: $((SECONDS - start)) s"

if [[ -n "${CKPT:-}" ]]; then
  unset PYTORCH_CUDA_ALLOC_CONF
  for f in "$base" "$base,lora_mlp,lora_qkv"; do run "$f" 150 train llama-7b lora 2 2048 1 8 cuda:0; done
fi
if [[ -n "${QLORA:-}" ]]; then
  unset PYTORCH_CUDA_ALLOC_CONF
  for f in "$base" "$base,lora_mlp,lora_qkv"; do run "$f" 240 train llama-7b qlora 2 2048 1 8 cuda:0; done
fi

# One line per run: setting, step ms, tok/s, peak GiB, loss, paths.
python3 - "$log" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"): continue
    d = json.loads(line)
    print(f'{d["shape"]} ckpt={d["ckpt"]} fused={d.get("fused")}: {d["step_ms"]} ms, {d["tokens_per_s"]} tok/s, '
          f'peak {d["peak_gib"]} GiB, loss {d["loss"]:.4f} | {d.get("paths")}')
EOF
echo "total: $((SECONDS - start)) s"
