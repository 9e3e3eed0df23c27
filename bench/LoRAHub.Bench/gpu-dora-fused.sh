#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19 item 1 for DoRA, the fused LoRA
# MLP and q/k/v blocks with DoRA's row scale c = m/‖V‖ (norm detached). About 2–3 minutes:
#   1. Tests on CUDA: fused DoRA blocks vs composite DoRA (outputs; gradients of x, A, B, m; fp32 and bf16; Llama with
#      and without checkpointing; refusals; training losses), DoRA's kernels, and the LoRA fused-block tests again.
#   2. llama-1b r16 4×2048, 20 timed steps (+3 warm-up), default allocator: step ms and tok/s of our LoRA (fused blocks,
#      the default), DoRA with the blocks composite (DoRA's output and norm kernels on, as before this change) and DoRA
#      with the blocks fused (the new default; row scales inside CUDA kernels), and DoRA fused with
#      LORAHUB_LORA_ROWSCALE_KERNELS=0 (scales by tensor ops). Issue 19's target: DoRA fused tok/s ≥ 0.95 × LoRA's.
#   3. The same three under PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync, 50 timed steps: peak memory (the pool's
#      high-water mark, as bench-train.sh MEMORY=1) and the loss after the run (DoRA composite vs fused: same seed, equal
#      within bf16 noise).
# Every JSON line carries "fused" (the LORAHUB_FUSED setting) and "paths" (which path each block took, and why not fused).
# Output: $OUT/dora-fused.jsonl, $OUT/dora-fused-tests.log.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
log="$out/dora-fused.jsonl"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
base="rmsnorm,swiglu,rope,dora,doranorm"
all="$base,lora_mlp,lora_qkv"
run() { LORAHUB_FUSED="$1" timeout "$2" "${bench[@]}" "${@:3}" 2>&1 | grep -v '^   at ' | tail -3 | tee -a "$log"; }
start=$SECONDS

tests() { TIMEOUT=150 xunit_cuda "$@"; } # suite, class
{ tests LoRAHub.DoRA.Tests LoRAHub.DoRA.Tests.FusedDoraBlockTests
  tests LoRAHub.DoRA.Tests LoRAHub.DoRA.Tests.DoraFusedTests
  tests LoRAHub.TorchExtensions.Tests LoRAHub.TorchExtensions.Tests.LoraFusionTests
  tests LoRAHub.LoRA.Tests LoRAHub.LoRA.Tests.FusedLoraBlockTests; } > "$out/dora-fused-tests.log"
grep -E "Total:|\[FAIL\]" -A4 "$out/dora-fused-tests.log" | head -30
echo "tests: $((SECONDS - start)) s"

for m in "lora $all" "dora $base" "dora $all"; do
  read -r method fused <<< "$m"
  run "$fused" 120 train llama-1b "$method" 4 2048 0 20 cuda:0
done
# DoRA fused with the row scales applied by tensor ops instead of the row-scale kernels (what those kernels save).
LORAHUB_LORA_ROWSCALE_KERNELS=0 log="$out/dora-fused-rowscale-kernels-off.jsonl" run "$all" 120 train llama-1b dora 4 2048 0 20 cuda:0
echo "speed runs: $((SECONDS - start)) s"

export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
for m in "lora $all" "dora $base" "dora $all"; do
  read -r method fused <<< "$m"
  run "$fused" 150 train llama-1b "$method" 4 2048 0 50 cuda:0
done
echo "loss and memory runs: $((SECONDS - start)) s"

# One line per run: method, setting, step ms, tok/s, peak GiB, loss, paths; then DoRA/LoRA speed ratios.
python3 - "$log" "$base" "$out/dora-fused-rowscale-kernels-off.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for d in rows:
    print(f'{d.get("method", "?")} {d["shape"]} fused={d.get("fused")}: {d["step_ms"]} ms, {d["tokens_per_s"]} tok/s, '
          f'peak {d["peak_gib"]} GiB, loss {d["loss"]:.4f} | {d.get("paths")}')
first = {}
for d in rows: first.setdefault((d.get("method"), d.get("fused")), d["tokens_per_s"])  # the speed runs come first
keys = [("lora", f"{sys.argv[2]},lora_mlp,lora_qkv"), ("dora", sys.argv[2]), ("dora", f"{sys.argv[2]},lora_mlp,lora_qkv")]
if all(k in first for k in keys):
    lora, composite, fused = (first[k] for k in keys)
    print(f"DoRA composite / LoRA: {composite / lora:.3f}; DoRA fused / LoRA: {fused / lora:.3f} (target >= 0.95); "
          f"fused / composite: {fused / composite:.3f}")
    import os
    if os.path.exists(sys.argv[3]):
        for l in open(sys.argv[3]):
            if l.startswith("{"):
                d = json.loads(l)
                print(f'DoRA fused, row-scale kernels off: {d["step_ms"]} ms, {d["tokens_per_s"]} tok/s = {d["tokens_per_s"] / lora:.3f} x LoRA')
PY
echo "total: $((SECONDS - start)) s"
