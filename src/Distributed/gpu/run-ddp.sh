#!/usr/bin/env bash
# There: the 2-GPU machine (kind nvidia-h200-x2), from the repo root, after scripts/gpu/prepare.sh here and with
# ../shared/bench/peer_ddp.py and peer_bench.py copied into .gpu/. One call:
#   1. NCCL correctness of the trainer: 2 ranks × batch b against 1 rank × 2b (fp32; full fine-tuning plain and with
#      ZeRO-1 sharded state, GaLore sharded), with the gradient all-reduce overlapped with backward (the default), plus
#      the plain case with LORAHUB_DDP_OVERLAP=0 (all buckets after backward); each row says how many buckets rank 0
#      started during / after backward;
#   2. the killed-rank case on NCCL (rank 1 SIGKILLs itself after step 3; rank 0's watchdog (10 s) should abort and name
#      rank 1 before the launcher's 20 s grace ends; the run must end with an error naming rank 1,
#      within a bounded time, with checkpoint-000002 intact);
#   3. throughput, ours and the peer's from the same call: LoRA r16 llama-1b 4×2048 per GPU and full fine-tuning
#      llama-1b on 1 and 2 GPUs (ours through our launcher, the peer through torchrun); ours on N > 1 GPUs overlapped
#      ("overlap": true in its row), and once more with LORAHUB_DDP_OVERLAP=0 ("overlap": false) to measure both.
# JSON lines go to $OUT/ddp.jsonl (and stdout); logs to $OUT/ddp-*.log. STEPS (default 8) sets the timed steps;
# GPUS (default "1 2") the GPU counts of part 3 (e.g. GPUS="1 2 4" on nvidia-h200-x4, issue 22); OVERLAP_OFF_METHODS
# (default "full"; "lora full" for both, "" for none) the methods of part 3 measured a second time with the overlap off;
# THROUGHPUT_ONLY=1 runs part 3 alone, without ZeRO-1.
set -uo pipefail
source scripts/gpu/env.sh
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
log="$out/ddp.jsonl"; : > "$log"
host=(dotnet .publish/host/loraHub.dll)
bench=(dotnet .publish/tests/LoRAHub.Bench.dll)
steps=${STEPS:-8}
gpus=(${GPUS:-1 2})
off_methods=${OVERLAP_OFF_METHODS-full}
if command -v torchrun > /dev/null; then torchrun=(torchrun); else torchrun=(python3 -m torch.distributed.run); fi
check=src/Distributed/gpu/ddp_check.csx
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
emit() { echo "$1" | tee -a "$log"; }

if [[ -z "${THROUGHPUT_ONLY:-}" ]]; then   # THROUGHPUT_ONLY=1: part 3 alone (a call short of time; parts 1-2 unchanged code)
echo "== 1. trainer on NCCL: 2 ranks x 2 rows == 1 rank x 4 rows (fp32)"
work=/tmp/lorahub-ddp; rm -rf "$work"
"${host[@]}" run "$check" "$work/one" 4 0 > "$out/ddp-check-one.log" 2>&1 || echo "check: 1 rank failed (see ddp-check-one.log)"
# shard 0/1: plain / ZeRO-1, overlapped; "0-plain": plain with the overlap off.
for variant in 0 1 0-plain; do
  shard=${variant%%-*}
  overlap=$([[ $variant == *plain ]] && echo 0 || echo 1)
  LORAHUB_DDP_OVERLAP=$overlap "${host[@]}" run --nproc-per-node 2 --master-port $(case $variant in 0) echo 29510;; 1) echo 29511;; *) echo 29514;; esac) "$check" "$work/two-$variant" 2 $shard \
    > "$out/ddp-check-two-$variant.log" 2>&1 || echo "check: 2 ranks ($variant) failed (see ddp-check-two-$variant.log)"
  emit "$(python3 - "$work/one/losses.json" "$work/two-$variant" $shard $overlap <<'PY'
import json, sys
try:
    a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2] + "/losses.json"))
    rel = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
    launches = json.load(open(sys.argv[2] + "/launches-0.json"))
except Exception as e:
    a, b, rel, launches = [], [], float("inf"), None
overlap = sys.argv[4] == "1"
# Overlapped: buckets must have started during backward; plain: none may.
started_ok = launches is not None and ((launches[0] > 0) if overlap else (launches[0] == 0))
print(json.dumps(dict(check="nccl-2x2-vs-1x4", zero=sys.argv[3] == "1", overlap=overlap, max_rel_diff=rel,
                      buckets_in_backward=launches[0] if launches else None, buckets_after_backward=launches[1] if launches else None,
                      ok=rel <= 1e-4 and started_ok, one=a, two=b)))
PY
)"
done

# GaLore with sharded state (ZeRO-1): projectors refreshed every 2 steps on the owning rank only.
"${host[@]}" run "$check" "$work/galore-one" 4 0 0 galore > "$out/ddp-check-galore-one.log" 2>&1 || echo "check: galore 1 rank failed"
"${host[@]}" run --nproc-per-node 2 --master-port 29512 "$check" "$work/galore-two" 2 1 0 galore > "$out/ddp-check-galore-two.log" 2>&1 || echo "check: galore 2 ranks failed"
emit "$(python3 - "$work/galore-one/losses.json" "$work/galore-two/losses.json" <<'PY'
import json, sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    rel = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
except Exception:
    a, b, rel = [], [], float("inf")
print(json.dumps(dict(check="nccl-galore-zero-2x2-vs-1x4", max_rel_diff=rel, ok=rel <= 1e-4, one=a, two=b)))
PY
)"

echo "== 2. killed rank on NCCL (rank 1 SIGKILLs itself after step 3)"
start=$(date +%s.%N)
LORAHUB_DIST_TIMEOUT=10 LORAHUB_KILL_GRACE=20 "${host[@]}" run --nproc-per-node 2 --master-port 29520 "$check" "$work/killed" 2 0 3 > "$out/ddp-killed.log" 2>&1
code=$?
secs=$(python3 -c "import time;print(round(time.time()-$start,1))")
named=$(grep -c "rank 1" "$out/ddp-killed.log")
watchdog=$(grep -c "did not finish within\|NCCL reported" "$out/ddp-killed.log")
intact=$([[ -f "$work/killed/checkpoint-000002/trainer_state.json" ]] && echo true || echo false)
emit "{\"check\": \"nccl-killed-rank\", \"exit_code\": $code, \"seconds\": $secs, \"names_rank_1\": $([[ $named -gt 0 ]] && echo true || echo false), \"watchdog_fired\": $([[ $watchdog -gt 0 ]] && echo true || echo false), \"checkpoint_2_intact\": $intact, \"ok\": $([[ $code -ne 0 && $named -gt 0 && $intact == true ]] && echo true || echo false)}"
grep -E "error|rank 1|did not finish|NCCL reported" "$out/ddp-killed.log" | head -8

fi

echo "== 3. throughput: ours (our launcher) and the peer (torchrun), on ${gpus[*]} GPUs"
port=29530
for method in lora full; do
  for n in "${gpus[@]}"; do
    port=$((port + 1))
    MASTER_PORT=$port "${bench[@]}" --nproc-per-node $n train llama-1b $method 4 2048 0 $steps 2> "$out/ddp-ours-$method-$n.log" | grep '^{' | tail -1 | tee -a "$log"
    tail -3 "$out/ddp-ours-$method-$n.log" | grep -iE "error|exception" && echo "(ours $method x$n failed; see ddp-ours-$method-$n.log)"
    if [[ $n -gt 1 && " $off_methods " == *" $method "* ]]; then # the same with the all-reduce after backward (overlap off)
      port=$((port + 1))
      LORAHUB_DDP_OVERLAP=0 MASTER_PORT=$port "${bench[@]}" --nproc-per-node $n train llama-1b $method 4 2048 0 $steps 2> "$out/ddp-ours-$method-$n-nooverlap.log" | grep '^{' | tail -1 | tee -a "$log"
    fi
    port=$((port + 1))
    "${torchrun[@]}" --nproc-per-node $n --master-port $port .gpu/peer_ddp.py llama-1b $method 4 2048 0 2> "$out/ddp-peer-$method-$n.log" | grep '^{' | tail -1 | tee -a "$log"
  done
done
# Sharded optimizer state (ZeRO-1) for full fine-tuning, ours only: the trainer's default for full and GaLore.
nmax=${gpus[-1]}
port=$((port + 1))
[[ -z "${THROUGHPUT_ONLY:-}" ]] && LORAHUB_BENCH_ZERO=1 MASTER_PORT=$port "${bench[@]}" --nproc-per-node $nmax train llama-1b full 4 2048 0 $steps 2> "$out/ddp-ours-full-$nmax-zero.log" | grep '^{' | tail -1 | tee -a "$log"

echo "== summary (tokens/s; scaling = N GPUs / 1 GPU)"
python3 - "$log" "${gpus[@]}" <<'PY' | tee -a "$log"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def tps(impl, method, world, zero=False, overlap=True):
    for r in rows:
        w = r.get("world", 1)
        # ours on several ranks: the overlapped row, or with overlap=False the LORAHUB_DDP_OVERLAP=0 one
        if impl == "lorahub" and w > 1 and bool(r.get("overlap", False)) != overlap:
            continue
        if r.get("impl") == impl and r.get("method") == method and w == world and bool(r.get("zero", False)) == zero:
            return r["tokens_per_s"]
counts = [int(n) for n in sys.argv[2:]]
s = lambda a, b: round(b / a, 3) if a and b else None
for method in ("lora", "full"):
    o1, p1 = tps("lorahub", method, 1), tps("peer-ddp", method, 1)
    for n in counts[1:]:
        on, pn = tps("lorahub", method, n), tps("peer-ddp", method, n)
        lead1, leadn = s(p1, o1), s(pn, on)
        plain = tps("lorahub", method, n, overlap=False)
        print(json.dumps(dict(summary=method, gpus=n, ours_1=o1, ours_n=on, ours_scaling=s(o1, on), peer_1=p1, peer_n=pn,
                              peer_scaling=s(p1, pn), ours_over_peer_1=lead1, ours_over_peer_n=leadn,
                              lead_held=(leadn >= lead1 - 0.03) if lead1 and leadn else None,
                              ours_n_overlap_off=plain, ours_scaling_overlap_off=s(o1, plain))))
PY
