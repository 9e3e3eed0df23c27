"""PyTorch eager counterparts of LoRAHub.Bench (same shapes, same JSON fields), run in the same session on the
same GPU so the two can be compared as ratios. Usage: python3 torch_reference.py matmul [n] | tiny-op [iters]"""
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
                          ms=round(s * 1e3, 3), tflops=round(2.0 * n ** 3 / s / 1e12, 1))))

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

if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "tiny-op"
    dev = torch.device(sys.argv[3] if len(sys.argv) > 3 else ("cuda" if torch.cuda.is_available() else "cpu"))
    if mode == "matmul":
        matmul(int(sys.argv[2]) if len(sys.argv) > 2 else 8192, dev)
    else:
        tiny_op(int(sys.argv[2]) if len(sys.argv) > 2 else 100_000, dev)
