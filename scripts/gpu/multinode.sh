#!/usr/bin/env bash
# There (kind nvidia-h200-x2, after scripts/gpu/prepare.sh here): the multi-node launch path on one machine — two
# launchers, `--nnodes 2 --node-rank 0|1`, one rank each, each seeing a different GPU (CUDA_VISIBLE_DEVICES), meeting
# through MASTER_ADDR:MASTER_PORT over TCP as two machines would. The trainer's loss curve must equal one rank with the
# whole batch (src/Distributed/gpu/ddp_check.csx: 2 nodes × 2 rows against 1 rank × 4 rows, fp32). JSON to $OUT/multinode.jsonl.
set -uo pipefail
source scripts/gpu/env.sh
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
host=(dotnet .publish/host/loraHub.dll)
check=src/Distributed/gpu/ddp_check.csx
work=/tmp/lorahub-multinode; rm -rf "$work"
CUDA_VISIBLE_DEVICES=0 "${host[@]}" run "$check" "$work/one" 4 0 > "$out/multinode-one.log" 2>&1 || echo "multinode: 1 rank failed"
for node in 0 1; do
  CUDA_VISIBLE_DEVICES=$node "${host[@]}" run --nproc-per-node 1 --nnodes 2 --node-rank $node --master-addr 127.0.0.1 \
    --master-port 29540 "$check" "$work/two" 2 0 > "$out/multinode-node$node.log" 2>&1 &
done
wait
python3 - "$work/one/losses.json" "$work/two/losses.json" <<'PY' | tee "$out/multinode.jsonl"
import json, sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    rel = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
except Exception:
    a, b, rel = [], [], float("inf")
print(json.dumps(dict(check="nccl-2-nodes-x1-vs-1x4", max_rel_diff=rel, ok=rel <= 1e-4, one=a, two=b)))
PY
