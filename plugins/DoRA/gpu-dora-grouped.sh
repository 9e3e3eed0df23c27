#!/usr/bin/env bash
# There (GPU machine, from the repo root, after scripts/gpu/prepare.sh here): DoRA's extra time per step (issue 19, DoRA
# >= 0.95x our LoRA): one grouped launch for a step's 112 norms and row scales (LoraWeightNorms.grouped_low_rank_row_norms,
# filled by DoraNormGroup at the step's first forward; pipelined block code), m's gradient divided in the launch that sums
# it, and the row-scale backward's column reduce inside its kernel (one launch less per scaled projection).
# About 90-110 s; files in $OUT/dora-grouped/:
#   1. tests.log: the DoRA norm/cache/fused tests on CUDA (GroupedNormTests: grouped vs fp64 definition and the
#      per-projection kernel, c = m.div(norm) bit for bit, pipelined = plain bits, refusals, a Llama's steps: one grouped
#      launch of 14 items per step and the per-projection losses) and TorchExtensions' row-scale tests
#      (LoraRowScaleDivisorTests: divided gradients = autograd's division, fused column reduce = lh_lora_col_reduce, bit
#      for bit).
#   2. grouped-bench.txt: one llama-1b step's norms, 112 per-projection launches vs one grouped launch, plain vs pipelined
#      block code (us per step, host us).
#   3. host-bench.txt + host-trace.nettrace.xz: host milliseconds per step of a 16-layer Llama with tiny widths (the GPU
#      work is negligible: the host's own time) trained by LoRA and by DoRA, (DoRA − LoRA)/112 per projection, and the
#      EventPipe CPU samples of that run (here: dotnet-trace convert --format speedscope; the last two Steps calls are
#      LoRA's and DoRA's timed runs).
#   4. bench.jsonl: llama-1b r16 4x2048, 12 steps: LoRA, DoRA (defaults), DoRA with the session-7 paths off
#      (LORAHUB_DORA_NORM_GROUPED=0 LORAHUB_LORA_ROWSCALE_FUSED_REDUCE=0); then (time permitting) LoRA and DoRA at batch 1
#      (host_ms there is the host's own time); the DoRA/LoRA tok/s ratios (target >= 0.95).
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}/dora-grouped"; mkdir -p "$out"
start=$SECONDS

export LORAHUB_DORA_GROUPED_BENCH="$out/grouped-bench.txt"
: > "$LORAHUB_DORA_GROUPED_BENCH"
{ TIMEOUT=120 xunit_cuda LoRAHub.DoRA.Tests GroupedNormTests NormKernelTests NormKernelSplitTests NormCacheTests DoraFusedTests \
    FusedDoraBlockTests
  TIMEOUT=60 xunit_cuda LoRAHub.TorchExtensions.Tests LoraRowScaleDivisorTests LoraRowScaleKernelTests LoraFusionTests; } > "$out/tests.log"
unset LORAHUB_DORA_GROUPED_BENCH
grep -E "Total:|\[FAIL\]" -A6 "$out/tests.log" | head -40
grep -i "did not compile" "$out/tests.log" | head -3
cat "$out/grouped-bench.txt"
echo "tests: $((SECONDS - start)) s"

# The host's own time per DoRA projection, with CPU samples (one process: the xunit console runs the test in-process).
( export DOTNET_EnableEventPipe=1 DOTNET_EventPipeOutputPath="$out/host-trace.nettrace" DOTNET_EventPipeCircularMB=256 \
    DOTNET_EventPipeConfig='Microsoft-DotNETCore-SampleProfiler:0:5,Microsoft-Windows-DotNETRuntime:0x1:4' \
    LORAHUB_DORA_HOST_BENCH="$out/host-bench.txt"
  TIMEOUT=60 xunit_cuda LoRAHub.DoRA.Tests DoraHostTimeTests ) > "$out/host-bench.log"
grep -E "Total:|\[FAIL\]" "$out/host-bench.log" | head -3
cat "$out/host-bench.txt" 2>/dev/null
[[ -f "$out/host-trace.nettrace" ]] && xz -T0 -3 "$out/host-trace.nettrace"
echo "host bench: $((SECONDS - start)) s"

bench() { timeout 90 dotnet .publish/tests/LoRAHub.Bench.dll train llama-1b "$1" "$2" 2048 0 12 cuda:0 2>&1 | grep '^{' | tail -1; }
: > "$out/bench.jsonl"
for run in "lora 4 1" "dora 4 1" "dora 4 0" "lora 1 1" "dora 1 1"; do
  read -r method batch session7 <<< "$run"
  [[ $batch == 1 ]] && (( SECONDS - start > 100 )) && continue
  LORAHUB_DORA_NORM_GROUPED=$session7 LORAHUB_LORA_ROWSCALE_FUSED_REDUCE=$session7 bench "$method" "$batch" \
    | sed "s/^{/{\"session7\":$session7,/" >> "$out/bench.jsonl"
done
echo "bench: $((SECONDS - start)) s"

python3 - "$out/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {(d.get("method"), d.get("batch"), d.get("session7")): d for d in rows}
for d in rows:
    print(f'{d.get("method")} batch {d.get("batch")} session7={d.get("session7")}: {d["step_ms"]} ms/step, {d["tokens_per_s"]} tok/s, '
          f'host {d["host_ms"]}, loss {d.get("loss")}')
lora = by.get(("lora", 4, 1))
for s in (1, 0):
    if lora and ("dora", 4, s) in by:
        print(f'DoRA (session-7 paths {"on" if s else "off"}) / LoRA tok/s: {by[("dora", 4, s)]["tokens_per_s"] / lora["tokens_per_s"]:.3f} (target >= 0.95)')
PY
echo "total: $((SECONDS - start)) s"
