"""Where the GPU idles in one captured training step (scripts/gpu/timeline-step.sh): from a GPU trace (kernels: start,
duration, correlation id, stream, name) and an API trace (host CUDA calls) in CSV — scripts/gpu/cupti_trace.c's files, or
Nsight Systems' cuda_gpu_trace and cuda_api_trace reports — the span of the GPU work, the sum of kernel and copy times, the idle time between them,
the largest gaps with the work before and after each, and for each gap the host's CUDA calls that ran during it (a
synchronization or a blocking copy there means the host waited; a late launch means the host was behind).
When the API trace holds a profiler start and stop (the bench's LORAHUB_BENCH_PROFILE_STEP), only the work launched
between them counts. Usage: timeline_gaps.py GPU_TRACE.csv [API_TRACE.csv] [TOP]"""
import csv, re, sys
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
    print_kernels(gpu, busy)
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

def idents(mangled):
    # The length-prefixed identifiers of an Itanium-mangled name, in order (enough to label a kernel; not a demangler).
    out, i = [], 0
    while i < len(mangled):
        m = re.match(r"(\d+)", mangled[i:])
        if m and (i == 0 or not mangled[i - 1].isdigit()) and mangled[max(i - 2, 0)] != "L":  # not a literal (Li8E)
            n, j = int(m.group(1)), i + len(m.group(1))
            ident = mangled[j:j + n]
            if n and re.fullmatch(r"[A-Za-z_]\w*", ident): out.append(ident); i = j + n; continue
        i += 1
    return out

def short(name):
    # The kernel's own name, and for PyTorch's elementwise kernels (all one name) the functor that tells them apart.
    if not name.startswith("_Z"): return name[:70]
    ids = idents(name[2:])
    head = []
    for ident in ids:
        head.append(ident)
        if "kernel" in ident.lower() or len(head) >= 3: break
    base = "::".join(head)[:70]
    what = [i for i in ids[len(head):] if i.endswith("Functor") or i.startswith("CUDAFunctor") or i.endswith("_kernel_cuda")]
    return base + (f" <{what[-1]}>" if what else "")

def print_kernels(gpu, busy, top=45):
    # Where the busy time goes, by kernel: the list to pick the next thing to make faster.
    totals = defaultdict(lambda: [0, 0])
    for s, d, name, corr, strm in gpu:
        t = totals[short(name)]; t[0] += 1; t[1] += d
    print(f"busy time by kernel (top {top} of {len(totals)}; count, total ms, share, mean us):")
    for n, (k, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {k:5d} {t/1e6:8.3f} {100 * t / max(busy, 1):5.1f}% {t / k / 1000:8.1f}  {n}")

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None, int(sys.argv[3]) if len(sys.argv) > 3 else 25)
