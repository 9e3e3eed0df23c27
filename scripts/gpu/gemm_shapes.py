"""The GEMMs of one llama training step, alone, on the installed PyTorch's cuBLAS (the library our TorchSharp build calls
there): time and TFLOP/s per shape, and the same products with the projections that read one input stacked into one
weight (q/k/v, gate/up), forward and the dx of backward (one GEMM with K summed instead of a GEMM plus addmm's).
What stacking the frozen bases would buy before writing it. Usage: gemm_shapes.py [tokens] [hidden] [inter] [kv] [vocab]
[ce_chunk] (default llama-1b 4×2048: 8192 2048 8192 512 128256 1024)."""
import sys
import torch

def timed(fn, reps=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps): fn()
    stop.record(); torch.cuda.synchronize()
    return start.elapsed_time(stop) / reps * 1000  # µs

def main(T=8192, d=2048, f=8192, kv=512, V=128256, chunk=1024, r=16):
    dev, dt = "cuda", torch.bfloat16
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt) * 0.02
    x, h = rnd(T, d), rnd(T, f)
    wq, wk, wv, wo = rnd(d, d), rnd(kv, d), rnd(kv, d), rnd(d, d)
    wg, wu, wd = rnd(f, d), rnd(f, d), rnd(d, f)
    wqkv, wgu = torch.cat([wq, wk, wv]), torch.cat([wg, wu])
    dq, dk, dv, dy = rnd(T, d), rnd(T, kv), rnd(T, kv), rnd(T, d)
    dg, du, dqkv, dgu = rnd(T, f), rnd(T, f), rnd(T, d + 2 * kv), rnd(T, 2 * f)
    emb, xc, dl = rnd(V, d), rnd(chunk, d), rnd(chunk, V)
    a3, a2, ad = rnd(3 * r, d), rnd(2 * r, d), rnd(r, f)
    out = torch.empty(T, d, device=dev, dtype=dt)
    rows = []
    def row(name, flop, fn):
        us = timed(fn)
        rows.append((name, us, flop / us / 1e6))
    mm = lambda m, n, k: 2.0 * m * n * k
    # Forward, separate bases as today.
    row("fwd q  x@Wq^T", mm(T, d, d), lambda: x.mm(wq.t()))
    row("fwd k  x@Wk^T (v same)", mm(T, kv, d), lambda: x.mm(wk.t()))
    row("fwd qkv stacked", mm(T, d + 2 * kv, d), lambda: x.mm(wqkv.t()))
    row("fwd o", mm(T, d, d), lambda: x.mm(wo.t()))
    row("fwd gate (up same)", mm(T, f, d), lambda: x.mm(wg.t()))
    row("fwd gate+up stacked", mm(T, 2 * f, d), lambda: x.mm(wgu.t()))
    row("fwd down", mm(T, d, f), lambda: h.mm(wd.t()))
    row(f"fwd lm_head chunk {chunk}", mm(chunk, V, d), lambda: xc.mm(emb.t()))
    # Backward dx.
    def dx_qkv():
        torch.mm(dq, wq, out=out); out.addmm_(dk, wk); out.addmm_(dv, wv)
    row("bwd dx q,k,v (mm + 2 addmm)", mm(T, d, d + 2 * kv), dx_qkv)
    row("bwd dx qkv stacked (one mm)", mm(T, d, d + 2 * kv), lambda: torch.mm(dqkv, wqkv, out=out))
    def dx_gu():
        torch.mm(dg, wg, out=out); out.addmm_(du, wu)
    row("bwd dx gate,up (mm + addmm)", mm(T, d, 2 * f), dx_gu)
    row("bwd dx gate+up stacked", mm(T, d, 2 * f), lambda: torch.mm(dgu, wgu, out=out))
    row("bwd dh down dy@Wd", mm(T, f, d), lambda: dy.mm(wd))
    row("bwd dx o", mm(T, d, d), lambda: dy.mm(wo))
    row(f"bwd lm_head dx chunk {chunk}", mm(chunk, d, V), lambda: dl.mm(emb))
    # The thin products of the updates (r per projection).
    row("lowrank x@[Aq;Ak;Av]^T", mm(T, 3 * r, d), lambda: x.mm(a3.t()))
    row("lowrank dA=dxa^T@x (3r)", mm(3 * r, d, T), lambda: dqkv[:, :3 * r].t().mm(x))
    row("lowrank h@Ad^T", mm(T, r, f), lambda: h.mm(ad.t()))
    row("lowrank dAd=dxa^T@h", mm(r, f, T), lambda: dy[:, :r].t().mm(h))
    row("lowrank dB=dy^T@xa (d x r)", mm(d, r, T), lambda: dy.t().mm(dqkv[:, :r]))
    print(f"{'GEMM':34s} {'us':>9s} {'TFLOP/s':>8s}   ({torch.cuda.get_device_name()}, torch {torch.__version__})")
    for name, us, tf in rows:
        print(f"{name:34s} {us:9.1f} {tf:8.1f}")

if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:]])
