"""Summarises an Nsight Compute CSV of kernel durations (profile-step.sh): total GPU time, then kernels grouped by
family (GEMMs by grid, so that shapes stay apart), largest first, then the first 400 kernels in launch order."""
import csv, re, sys
from collections import defaultdict

UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}

def rows(path):
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        us = float(r["Metric Value"].replace(",", "")) * UNIT.get(r["Metric Unit"], 1.0)
        yield r["Kernel Name"], r.get("Grid Size", ""), r.get("Block Size", ""), us

def family(name, grid):
    short = re.sub(r"\(.*", "", name)
    short = re.sub(r"<.*", "", short).strip()
    if re.search(r"gemm|cutlass|sm90|nvjet|cublas", name, re.I):
        return f"GEMM {short[:60]} grid={grid}"
    return short[:90]

def main(path):
    ks = list(rows(path))
    total = sum(k[3] for k in ks)
    print(f"kernels {len(ks)}, GPU time {total / 1e3:.2f} ms")
    groups = defaultdict(lambda: [0, 0.0])
    for name, grid, block, us in ks:
        g = groups[family(name, grid)]
        g[0] += 1; g[1] += us
    gemm = sum(v[1] for k, v in groups.items() if k.startswith("GEMM"))
    print(f"GEMM {gemm / 1e3:.2f} ms ({100 * gemm / max(total, 1e-9):.1f}%), other {(total - gemm) / 1e3:.2f} ms")
    for k, (n, us) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:60]:
        print(f"{us / 1e3:9.3f} ms {100 * us / max(total, 1e-9):5.1f}%  n={n:5d}  {k}")
    print("\nlaunch order (first 400):")
    for i, (name, grid, block, us) in enumerate(ks[:400]):
        print(f"{i:4d} {us:9.1f} us  grid={grid} block={block}  {name[:140]}")

if __name__ == "__main__":
    main(sys.argv[1])
