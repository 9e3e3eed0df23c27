"""PyTorch eager counterparts of LoRAHub.Bench (same shapes, same loops, same JSON fields), run in the same session on
the same machine so the two can be compared as ratios.
Usage: python3 torch_reference.py matmul [n] [device] | tiny-op [iters] [device] | ops [iters] [device]"""
import json, sys, time
import torch

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()

def matmul(n, dev):
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(5):
        a @ b
    sync(dev)
    iters = 50 if dev.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(dev)
    s = (time.perf_counter() - t0) / iters
    print(json.dumps(dict(impl="pytorch", bench="matmul", n=n, dtype=str(dtype).replace("torch.", ""), device=str(dev),
                          ms=round(s * 1e3, 3), tflops=round(2.0 * n ** 3 / s / 1e12, 3))))

def tiny_op(iters, dev):
    x = torch.ones(1, device=dev, requires_grad=True)
    for _ in range(10_000):
        x + 1.0
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        x + 1.0
    sync(dev)
    us = (time.perf_counter() - t0) * 1e6 / iters
    print(json.dumps(dict(impl="pytorch", bench="tiny-op", op="add(1-element, requires_grad)", device=str(dev),
                          iterations=iters, us_per_op=round(us, 3))))

def ops(iters, dev):
    # The same list as OpBench.Ops: 64x64 fp32, no grad, each result freed before the next op.
    x = torch.randn(64, 64, device=dev)
    w = torch.randn(64, 64, device=dev)
    idx = torch.arange(0, 32, dtype=torch.int64, device=dev)
    table = [
        ("add", lambda: x.add(w)),
        ("mul_scalar", lambda: x.mul(2.0)),
        ("matmul", lambda: x.matmul(w)),
        ("linear", lambda: torch.nn.functional.linear(x, w)),
        ("relu", lambda: x.relu()),
        ("softmax", lambda: x.softmax(-1)),
        ("sum_dim", lambda: x.sum(dim=1)),
        ("view", lambda: x.view(4096)),
        ("transpose", lambda: x.transpose(0, 1)),
        ("narrow", lambda: x.narrow(0, 8, 16)),
        ("index_select", lambda: x.index_select(0, idx)),
        ("cat", lambda: torch.cat([x, w], 0)),
        ("to_bf16", lambda: x.to(torch.bfloat16)),
    ]
    with torch.no_grad():
        for name, op in table:
            for _ in range(2_000):
                op()
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(iters):
                op()
            sync(dev)
            us = (time.perf_counter() - t0) * 1e6 / iters
            print(json.dumps(dict(impl="pytorch", bench="op", op=name, shape="64x64", device=str(dev), iterations=iters,
                                  us_per_op=round(us, 3))))

if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "tiny-op"
    dev = torch.device(sys.argv[3] if len(sys.argv) > 3 else ("cuda" if torch.cuda.is_available() else "cpu"))
    if mode == "matmul":
        matmul(int(sys.argv[2]) if len(sys.argv) > 2 else 8192, dev)
    elif mode == "ops":
        ops(int(sys.argv[2]) if len(sys.argv) > 2 else 20_000, dev)
    else:
        tiny_op(int(sys.argv[2]) if len(sys.argv) > 2 else 100_000, dev)
