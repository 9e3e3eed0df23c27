#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): issue 19, attention's elementwise work —
# the per-token rope kernel and q/k rotated + k/v repeated to the query heads in one kernel each way
# (src/TorchExtensions/FusedOps/RopeGqaKernels.cs, RopeGqaFunction.cs). About 120 s:
#   1. Its tests on CUDA: kernels vs composite and vs an fp32 reference rounded once (forward, gradients; fp32/bf16/fp16;
#      heads 32/8, 4/4, odd shapes, packed tables, three input layouts), the older rope test, and the Llama model with
#      the kernel vs the older path (logits, all parameter gradients) plus the packing tests.
#   2. llama-1b LoRA r16 4×2048, 8 timed steps: LORAHUB_ROPE_GQA_KERNEL=0 (older rope kernel + expand-and-copy repeat)
#      vs the kernels (default: k, v written as (B, T, H, D) memory like q) vs the kernels writing k, v (B, H, T, D) as
#      the copy did (LORAHUB_ROPE_GQA_KV_LAYOUT=bhtd: which layout SDPA reads faster): step ms, tok/s, loss (same seed:
#      equal within bf16 noise), peak memory.
#   3. NCU=1 (+~40 s, where ncu is installed): the rope kernels alone in one step: duration, DRAM bytes and bandwidth per
#      launch (expected per layer: q/k/v forward ~35-40 us for ~136 MB, backward ~35 us for ~136 MB, vs today's
#      61 + 22 us rope + 2×49.6 us repeat copies forward and 61 + 22 + 2×(22.6 + 14) us backward).
# Output: $OUT/rope-gqa.jsonl, $OUT/rope-gqa-tests.log, $OUT/rope-gqa-ncu.csv.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
log="$out/rope-gqa.jsonl"; : > "$log"
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
start=$SECONDS

tests() { TIMEOUT=100 xunit_cuda "$@"; } # suite, filters
# (xunit's console ANDs -class with -method filters: one run each.)
{ tests LoRAHub.TorchExtensions.Tests -class LoRAHub.TorchExtensions.Tests.RopeGqaKernelTests
  tests LoRAHub.TorchExtensions.Tests -method LoRAHub.TorchExtensions.Tests.FusedKernelTests.Fused_rope_matches_composite
  tests LoRAHub.Models.Tests -class LoRAHub.Models.Tests.RopeGqaAttentionTests -class LoRAHub.Models.Tests.PackingTests; } \
  > "$out/rope-gqa-tests.log"
grep -E "Total:|\[FAIL\]|did not compile" -A6 "$out/rope-gqa-tests.log" | head -60
echo "tests: $((SECONDS - start)) s"

run() { # LORAHUB_ROPE_GQA_KERNEL value, k/v layout of the kernel's outputs (bthd, bhtd)
  echo "== rope_gqa kernel=$1 kv_layout=$2" | tee -a "$log"
  LORAHUB_ROPE_GQA_KERNEL="$1" LORAHUB_ROPE_GQA_KV_LAYOUT="$2" timeout 90 "${bench[@]}" train llama-1b lora 4 2048 0 8 cuda:0 2>&1 \
    | grep -v '^   at ' | tail -3 | tee -a "$log"
}
run 0 bthd
run 1 bthd
run 1 bhtd
echo "speed runs: $((SECONDS - start)) s"

if [[ -n "${NCU:-}" ]] && command -v ncu > /dev/null; then
  # Only LoRAHub's rope kernels (fast): duration and DRAM bytes per launch, hence the bandwidth each reaches.
  LORAHUB_BENCH_PROFILE_STEP=1 timeout 120 ncu --profile-from-start off --clock-control none --kernel-name regex:lh_rope \
    --metrics gpu__time_duration.sum,dram__bytes.sum --csv --log-file "$out/rope-gqa-ncu.csv" \
    "${bench[@]}" train llama-1b lora 4 2048 0 3 cuda:0 > /dev/null 2>&1
  python3 - "$out/rope-gqa-ncu.csv" <<'EOF'
import csv, sys, collections
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if not l.startswith("==")) if len(r) > 10]
head = rows[0]; ki, mi, vi, ui, ii = (head.index(c) for c in ("Kernel Name", "Metric Name", "Metric Value", "Metric Unit", "ID"))
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1, "usecond": 1, "ms": 1e3, "msecond": 1e3,
         "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
per = collections.defaultdict(dict)
for r in rows[1:]:
    per[(r[ii], r[ki].split("(")[0])][r[mi]] = float(r[vi].replace(",", "")) * scale.get(r[ui], 1)
groups = collections.defaultdict(list)
for (_, name), m in per.items(): groups[name].append(m)
for name, ms in groups.items():
    us = [m.get("gpu__time_duration.sum", 0) for m in ms]; mb = [m.get("dram__bytes.sum", 0) / 1e6 for m in ms]
    print(f"{name}: {len(ms)} launches, {sum(us):.0f} us total; per launch {min(us):.1f}-{max(us):.1f} us, "
          f"{min(mb):.0f}-{max(mb):.0f} MB, {sum(mb) / max(sum(us), 1e-9):.2f} TB/s")
EOF
  echo "ncu: $((SECONDS - start)) s"
fi

python3 - "$log" <<'EOF'
import json, sys
label = ""
for line in open(sys.argv[1]):
    if line.startswith("=="): label = line.strip("= \n")
    if not line.startswith("{"): continue
    d = json.loads(line)
    print(f'{label}: {d.get("shape")} {d.get("step_ms")} ms, {d.get("tokens_per_s")} tok/s, peak {d.get("peak_gib")} GiB, '
          f'loss {d.get("loss")}, gpu_wait {d.get("gpu_wait_ms")} ms, host {d.get("host_ms")} ms')
EOF
echo "total: $((SECONDS - start)) s"
