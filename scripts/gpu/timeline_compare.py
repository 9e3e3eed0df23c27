"""Kernel time per training step of two CUPTI traces (scripts/gpu/timeline-step.sh's <plan>_gpu.csv, or .csv.xz), side
by side: each kernel's (or copy's) total over the trace divided by the trace's steps (lh_adamw launches: one per
optimizer step), sorted by the difference. A trace holds every step of the run, warm-up included, so the per-step
averages smooth out what one profiled step shows alone (one step's GEMMs can differ by ~5% between two runs of the same
code). Warm-up work (compiles, loads, re-homing) is spread over the steps too: compare traces of equal step counts.
Usage: timeline_compare.py A_gpu.csv[.xz] B_gpu.csv[.xz] [TOP]"""
import csv, lzma, re, sys
from collections import defaultdict

def rows(path):
    with (lzma.open(path, "rt", newline="") if path.endswith(".xz") else open(path, newline="")) as f:
        return list(csv.DictReader(f))

def col(row, *keys):
    for k in row:
        if any(k.startswith(key) for key in keys): return row[k]
    return None

def name(n):
    # The C++-mangled names of libtorch's kernels shortened to their namespace and functor.
    n = re.sub(r"^_ZN\d*(at6native|cudnn|cublasLt)\d*", r"\1::", n)
    return n[:70]

def per_step(path):
    totals, steps = defaultdict(float), 0
    for r in rows(path):
        d, n = col(r, "Duration"), col(r, "Name") or ""
        if d is None: continue
        totals[name(n)] += float(d) / 1000.0  # ns → µs
        if n.startswith("lh_adamw"): steps += 1
    steps = max(steps, 1)
    return {k: v / steps for k, v in totals.items()}, steps

def main(a_path, b_path, top=30):
    (a, sa), (b, sb) = per_step(a_path), per_step(b_path)
    print(f"steps: A {sa}, B {sb}; µs a step: A {sum(a.values()):.0f}, B {sum(b.values()):.0f}")
    keys = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, 0) - a.get(k, 0)))
    print(f"{'A µs':>9} {'B µs':>9} {'B − A':>9}  kernel")
    for k in keys[:top]:
        print(f"{a.get(k, 0):9.1f} {b.get(k, 0):9.1f} {b.get(k, 0) - a.get(k, 0):+9.1f}  {k}")

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 30)
