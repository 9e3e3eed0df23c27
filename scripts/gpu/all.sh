#!/usr/bin/env bash
# There (a 2-GPU machine, kind nvidia-h200-x2, from the repo root, after scripts/gpu/prepare.sh here): the session's GPU
# checks in one device call (at most 10 minutes), every step under its own time limit in seconds (NAME_S; 0 skips it):
#   1. both GPUs: data parallel (src/Distributed/gpu/run-ddp.sh: NCCL correctness, overlapped gradient sync, killed rank,
#      ours vs the peer; DDP_S), the two-launcher multi-node path (scripts/gpu/multinode.sh; MULTINODE_S) and full
#      fine-tuning's scaling by bucket size and NCCL setting (scripts/gpu/ddp-buckets.sh; BUCKETS_S);
#   2. two lanes side by side (LANE0, LANE1: the step names, in order) — by default GPU 0: run.sh (loraHub info, the main job, every published suite on cuda; RUN_S), the
#      training benchmark next to the peer (bench-train.sh PEER=1 on BENCH_PLAN; BENCH_S), the fused-block benchmarks
#      (FUSED_S, DORA_S), the PEFT checks (PEFT_S, HEAD_S, MATRIX_S, FAMILIES_S); GPU 1: CUDA out of memory and resume
#      (OOM_S), serve's batched multi-adapter throughput (SERVE_S), QLoRA loading memory (QLOAD_S), cross-entropy and
#      packing (CE_S), offloaded checkpointing and the longest sequence (CKPT_S), the peer's longest sequence (PEERLONG_S),
#      the long run (LONG_S). Also: `profile` (scripts/gpu/profile-step.sh on BENCH_PLAN; PROFILE_S), `host-trace`
#      (scripts/gpu/host-trace.sh; TRACE_S) and `x:PATH` for any script (X_S, default 150 s).
# Optional steps (no default limit) run only when their limit is given. Logs go to one folder, packed into $OUT/all.tgz
# after every step (the device tool returns few files, and what a call that runs out of time leaves in $OUT still comes back).
set -uo pipefail
source scripts/gpu/env.sh
export NCCL_NVLS_ENABLE=0
final="${OUT:-/tmp/lorahub-out}"; logs=/tmp/lorahub-all; rm -rf "$logs"; mkdir -p "$logs" "$final"
pack() { tar -C "$logs" -czf "$final/all.tgz.tmp" . && mv "$final/all.tgz.tmp" "$final/all.tgz"; }
step() {   # step GPUS SECONDS NAME COMMAND...: logs to $logs/NAME.log, its $OUT is $logs/NAME
  local gpus=$1 secs=$2 name=$3; shift 3
  [[ -z "$secs" || "$secs" == 0 ]] && return 0
  local start=$SECONDS
  mkdir -p "$logs/$name"
  CUDA_VISIBLE_DEVICES=$gpus OUT="$logs/$name" timeout -k 10 "$secs" "$@" > "$logs/$name.log" 2>&1
  echo "[gpu $gpus] $name: exit $? in $((SECONDS - start)) s (limit $secs)" | tee -a "$logs/steps.txt"
  pack
}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$logs/gpus.txt"
STEPS=${STEPS:-5} step 0,1 "${DDP_S:-330}" ddp bash src/Distributed/gpu/run-ddp.sh
step 0,1 "${MULTINODE_S:-}" multinode bash scripts/gpu/multinode.sh
step 0,1 "${BUCKETS_S:-}" ddp-buckets bash scripts/gpu/ddp-buckets.sh
# The steps of each lane, in order (a step runs only when its limit is set and not 0; see the header).
LANE0=${LANE0:-run bench lora-fused dora-fused peft headlora peft-matrix families}
LANE1=${LANE1:-oom serve-bench qlora-load ce-packing checkpoint peer-longest long-run}
# BENCH_PLAN: ";"-separated "SHAPE METHOD BATCH SEQ CKPT" lines for the training benchmark next to the peer.
IFS=';' read -ra plan <<< "${BENCH_PLAN:-llama-1b lora 4 2048 0;llama-1b dora 4 2048 0;llama-7b lora 2 2048 1;llama-7b qlora 2 2048 1}"
run_step() {   # run_step GPU NAME
  local g=$1
  case $2 in
    run)          SKIP_BINDING_BENCH=1 step $g "${RUN_S:-130}" run bash scripts/gpu/run.sh ;;
    bench)        PEER=1 step $g "${BENCH_S:-}" bench bash scripts/gpu/bench-train.sh "${plan[@]}" ;;
    lora-fused)   step $g "${FUSED_S:-}" lora-fused bash bench/LoRAHub.Bench/gpu-lora-fused.sh ;;
    dora-fused)   step $g "${DORA_S:-}" dora-fused bash bench/LoRAHub.Bench/gpu-dora-fused.sh ;;
    peft)         MATRIX=0 step $g "${PEFT_S:-45}" peft bash scripts/peft/check.sh ;;
    headlora)     step $g "${HEAD_S:-35}" headlora bash scripts/peft/check_headlora.sh ;;
    peft-matrix)  step $g "${MATRIX_S:-}" peft-matrix bash scripts/peft/check_matrix.sh ;;
    families)     step $g "${FAMILIES_S:-}" families bash scripts/fixtures/check_families.sh ;;
    oom)          step $g "${OOM_S:-80}" oom bash tests/LoRAHub.Reliability.Tests/gpu/oom.sh ;;
    serve-bench)  step $g "${SERVE_S:-60}" serve-bench bash src/Server/bench/serve-bench.sh "${SERVE_PLAN:-llama-1b 8 4 128 64 16 1}" ;;
    qlora-load)   step $g "${QLOAD_S:-70}" qlora-load bash scripts/fixtures/qlora_load_memory.sh ;;
    ce-packing)   step $g "${CE_S:-}" ce-packing bash src/Training/bench/ce-and-packing.sh ;;
    checkpoint)   step $g "${CKPT_S:-}" checkpoint bash bench/LoRAHub.Bench/gpu-checkpoint.sh ;;
    peer-longest) step $g "${PEERLONG_S:-}" peer-longest python3 scripts/gpu/peer_longest.py 24 ;;
    long-run)     step $g "${LONG_S:-}" long-run bash tests/LoRAHub.Reliability.Tests/gpu/long_run.sh "${LONG_STEPS:-10000}" ;;
    profile)      step $g "${PROFILE_S:-}" profile bash scripts/gpu/profile-step.sh "${plan[@]}" ;;
    host-trace)   step $g "${TRACE_S:-}" host-trace bash scripts/gpu/host-trace.sh ;;
    x:*)          step $g "${X_S:-150}" "$(basename "${2#x:}" .sh)" bash "${2#x:}" ;;   # any script, e.g. x:bench/LoRAHub.Bench/gpu-lora-fused.sh
    *)            echo "all.sh: unknown step '$2'" | tee -a "$logs/steps.txt" ;;
  esac
}
lane0() { for name in $LANE0; do run_step 0 "$name"; done; }
lane1() { for name in $LANE1; do run_step 1 "$name"; done; }
lane0 & lane1 & wait
{
  cat "$logs/steps.txt"
  grep -hE "Total:|\[FAIL\]|main job|exact match" "$logs/run.log" | head -40
  grep -hE '^\{' "$logs"/*.log | cut -c1-400 | head -80
  grep -hE "check (ok|FAIL)|growth|long run|interop" "$logs"/*.log 2>/dev/null | head -20
} > "$logs/summary.txt"
pack
cat "$logs/summary.txt"
