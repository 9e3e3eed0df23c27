"""The peer's longest trainable sequence within a memory cap (issue 19): transformers + PEFT bf16 LoRA r16 with gradient
checkpointing, batch 1, llama-7b shapes of ../shared/bench/peer_bench.py (imported from .gpu/, unchanged), on one GPU
capped with torch.cuda.set_per_process_memory_fraction. Doubling probes from START, then bisection to STEP tokens.
Usage: python3 scripts/gpu/peer_longest.py [CAP_GIB=24] [START=4096] [STOP=262144] [SHAPE=llama-7b]"""
import gc, json, os, sys
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".gpu"))
import peer_bench  # noqa: E402

cap, start, stop = float(sys.argv[1]) if len(sys.argv) > 1 else 24.0, int(sys.argv[2]) if len(sys.argv) > 2 else 4096, \
    int(sys.argv[3]) if len(sys.argv) > 3 else 262144
shape = sys.argv[4] if len(sys.argv) > 4 else "llama-7b"
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total)
# peer_bench.py builds the model in fp32 on the GPU and then casts it to bf16 (27 GB for llama-7b before the cast): with
# bf16 as the default dtype it is built in bf16 directly, so the cap measures training, not that construction.
torch.set_default_dtype(torch.bfloat16)


def fits(seq):
    try:
        res = peer_bench.run(shape, "lora", 1, seq, steps=1, warmup=1, ckpt=True)
        ok = res["peak_gib"] <= cap
    except torch.OutOfMemoryError:
        ok = False
    gc.collect()
    torch.cuda.empty_cache()
    print(json.dumps(dict(impl="peer", probe=seq, fits=ok, cap_gib=cap)), flush=True)
    return ok


best, seq, miss = 0, start, None
while seq <= stop:
    if fits(seq):
        best, seq = seq, seq * 2
    else:
        miss = seq
        break
# One bisection step between the last fit and the first miss, rounded to 1024 tokens.
if best and miss:
    mid = (best + miss) // 2 // 1024 * 1024
    if mid > best and fits(mid):
        best = mid
print(json.dumps(dict(impl="peer", shape=shape, method="lora bf16 + checkpointing", batch=1, cap_gib=cap, longest_seq=best)), flush=True)
