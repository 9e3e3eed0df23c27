"""Where the GPU idles in one captured training step (scripts/gpu/timeline-step.sh): from a GPU trace (kernels: start,
duration, correlation id, stream, name) and an API trace (host CUDA calls) in CSV — scripts/gpu/cupti_trace.c's files, or
Nsight Systems' cuda_gpu_trace and cuda_api_trace reports — the span of the GPU work, the sum of kernel and copy times, the idle time between them,
the largest gaps with the work before and after each, and for each gap the host's CUDA calls that ran during it (a
synchronization or a blocking copy there means the host waited; a late launch means the host was behind).
When the API trace holds a profiler start and stop (the bench's LORAHUB_BENCH_PROFILE_STEP), only the work launched
between them counts. Usage: timeline_gaps.py GPU_TRACE.csv [API_TRACE.csv] [TOP]"""
import csv, sys
from collections import defaultdict

def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

def col(row, *keys):
    for k in row:
        if any(k.startswith(key) for key in keys): return row[k]
    return None

def main(gpu_path, api_path=None, top=25):
    gpu = []
    for r in rows(gpu_path):
        start, dur = col(r, "Start"), col(r, "Duration")
        if start is None or dur is None: continue
        gpu.append((int(float(start)), int(float(dur)), col(r, "Name") or "", col(r, "CorrId", "CorrID") or "", col(r, "Strm") or ""))
    gpu.sort()
    api = []
    if api_path:
        for r in rows(api_path):
            s, d = col(r, "Start"), col(r, "Duration")
            if s is None or d is None: continue
            api.append((int(float(s)), int(float(d)), col(r, "Name") or "", col(r, "CorrID", "CorrId") or ""))
        api.sort()
        starts = [s for s, d, n, c in api if "ProfilerStart" in n]
        stops = [s for s, d, n, c in api if "ProfilerStop" in n]
        if starts and stops:
            t0 = starts[0]
            t1 = min((t for t in stops if t > t0), default=stops[-1])
            api = [a for a in api if t0 <= a[0] <= t1]
            launched = {c for s, d, n, c in api if c}
            gpu = [g for g in gpu if g[3] in launched]
            print(f"window: the work launched between the profiler start and stop ({(t1 - t0)/1e6:.2f} ms of host time)")
    if not gpu:
        print("no GPU work captured"); return
    busy, gaps, end = 0, [], gpu[0][0]
    by_stream = defaultdict(int)
    for i, (s, d, name, corr, strm) in enumerate(gpu):
        if s > end: gaps.append((s - end, end, i))
        # Overlapping work (another stream) counts once.
        busy += max(0, s + d - max(s, end))
        end = max(end, s + d)
        by_stream[strm] += d
    span = end - gpu[0][0]
    idle = sum(g for g, _, _ in gaps)
    print(f"GPU work items {len(gpu)}, span {span/1e6:.2f} ms, busy {busy/1e6:.2f} ms, idle {idle/1e6:.2f} ms in {len(gaps)} gaps")
    print("busy time by stream (ms): " + ", ".join(f"{k or '?'}: {v/1e6:.2f}" for k, v in sorted(by_stream.items(), key=lambda kv: -kv[1])))
    for limit in (5_000, 20_000, 100_000):
        n = [g for g, _, _ in gaps if g >= limit]
        print(f"  gaps >= {limit/1000:.0f} us: {len(n)}, {sum(n)/1e6:.2f} ms")
    if api:
        launch_of = {c: s for s, d, n, c in api if c}
        totals = defaultdict(lambda: [0, 0])
        for s, d, n, c in api:
            totals[n][0] += 1; totals[n][1] += d
        print("host CUDA calls in the capture (count, total ms):")
        for n, (k, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:14]:
            print(f"  {k:6d} {t/1e6:9.2f}  {n}")
    print(f"largest {top} gaps:")
    for g, at, i in sorted(gaps, reverse=True)[:top]:
        prev, nxt = gpu[i - 1][2][:60] if i > 0 else "-", gpu[i][2][:60]
        line = f"  {g/1000:8.1f} us at +{(at - gpu[0][0])/1e6:7.2f} ms  after {prev!r} before {nxt!r}"
        if api:
            launched = launch_of.get(gpu[i][3])
            if launched is not None: line += f"  (launched {(launched - at)/1000:+.1f} us from gap start)"
            during = [n for s, d, n, c in api if s < at + g and s + d > at and "Launch" not in n]
            if during:
                counts = defaultdict(int)
                for n in during: counts[n] += 1
                line += "  host: " + ", ".join(f"{n}×{k}" for n, k in counts.items())
        print(line)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None, int(sys.argv[3]) if len(sys.argv) > 3 else 25)
