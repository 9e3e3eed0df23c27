#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, the cross-entropy kernel of the
# fused linear cross-entropy (src/TorchExtensions/FusedOps/CrossEntropyKernels.cs). About 100 s:
#   1. Its tests on CUDA: kernel vs tensor ops (loss, both gradients; fp32/fp16/bf16, ignored rows, odd vocabularies,
#      chunk boundaries, unaligned rows, llama's 128,256 vocabulary) and chunked_cross_entropy vs plain cross_entropy.
#   2. llama-1b LoRA r16 4×2048, 8 timed steps: LORAHUB_CE_KERNEL=0 (tensor ops) vs the kernel (default): step ms, tok/s,
#      loss (same seed: equal within fp32 noise); then both under cudaMallocAsync for the peak memory (the kernel keeps no
#      fp32 copy of a chunk's logits: ~0.5 GiB less expected).
#   3. Where ncu is installed: the kernel's duration per chunk (8 per step), DRAM bytes (~3 passes of a chunk's 263 MB
#      of bf16 logits, less what pass 2 finds in L2), registers, achieved occupancy, L2 hit rate. Session 5 mid run:
#      259 us per chunk (466 MB read, 233 MB written) vs ~1,300 us of tensor ops; step 131.4 -> 123.7 ms, peak -0.97 GiB.
# Output: $OUT/ce-kernel.jsonl, $OUT/ce-kernel-tests.log, $OUT/ce-kernel-ncu.csv.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
log="$out/ce-kernel.jsonl"; : > "$log"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
start=$SECONDS

tests() { TIMEOUT=120 xunit_cuda "$@"; } # suite, class
{ tests LoRAHub.TorchExtensions.Tests LoRAHub.TorchExtensions.Tests.CrossEntropyKernelTests
  tests LoRAHub.Models.Tests LoRAHub.Models.Tests.FusedCrossEntropyTests; } > "$out/ce-kernel-tests.log"
grep -E "Total:|\[FAIL\]|did not compile" -A6 "$out/ce-kernel-tests.log" | head -60
echo "tests: $((SECONDS - start)) s"

run() { # LORAHUB_CE_KERNEL value, label
  echo "== ce kernel=$1 $2" | tee -a "$log"
  LORAHUB_CE_KERNEL="$1" timeout 90 "${bench[@]}" train llama-1b lora 4 2048 0 8 cuda:0 2>&1 | grep -v '^   at ' | tail -3 \
    | sed "s/^{/{\"ce_kernel\": \"$1\", /" | tee -a "$log"
}
run 0 speed; run 1 speed
echo "speed runs: $((SECONDS - start)) s"
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
run 0 memory; run 1 memory
unset PYTORCH_CUDA_ALLOC_CONF
echo "memory runs: $((SECONDS - start)) s"

if command -v ncu > /dev/null; then
  LORAHUB_BENCH_PROFILE_STEP=1 timeout 100 ncu --profile-from-start off --clock-control none -k regex:lh_cross_entropy \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct --csv --log-file "$out/ce-kernel-ncu.csv" \
    "${bench[@]}" train llama-1b lora 4 2048 0 3 cuda:0 2>&1 | grep -v '^==PROF==' | tail -2
  python3 - "$out/ce-kernel-ncu.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows: sys.exit(print("ncu: no rows"))
h = rows[0]; ix = {k: h.index(k) for k in ("Kernel Name", "Metric Name", "Metric Unit", "Metric Value")}
vals = collections.defaultdict(list)
for r in rows[1:]:
    vals[(r[ix["Metric Name"]], r[ix["Metric Unit"]])].append(float(r[ix["Metric Value"]].replace(",", "")))
for (m, u), v in sorted(vals.items()):
    print(f"lh_cross_entropy {m}: n={len(v)} mean={sum(v)/len(v):.1f} {u} min={min(v):.1f} max={max(v):.1f}")
PY
fi

python3 - "$log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"): continue
    d = json.loads(line)
    print(f'ce_kernel={d["ce_kernel"]}: {d["step_ms"]} ms, {d["tokens_per_s"]} tok/s, gpu_wait {d.get("gpu_wait_ms")} ms, '
          f'peak {d["peak_gib"]} GiB, loss {d["loss"]:.6f}')
PY
echo "total: $((SECONDS - start)) s"
