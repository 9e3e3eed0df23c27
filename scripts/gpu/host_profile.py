"""Sums a speedscope profile (dotnet-trace convert --format speedscope of scripts/gpu/host-trace.sh's trace) by method:
per thread, the inclusive and self milliseconds of every frame over the last FRACTION of the trace (default 0.5: the
timed steps, after startup and warm-up). Usage: host_profile.py FILE.speedscope.json [FRACTION] [TOP]."""
import json, sys
from collections import defaultdict

def main(path, fraction=0.5, top=45):
    d = json.load(open(path))
    names = [f["name"] for f in d["shared"]["frames"]]
    for p in d["profiles"]:
        start, end = p["startValue"], p["endValue"]
        lo = end - (end - start) * fraction
        incl, self_, leaf = defaultdict(float), defaultdict(float), defaultdict(float)
        stack, opened = [], []
        last = None
        for e in p["events"]:
            t = e["at"]
            if last is not None and stack and t > lo:
                dt = t - max(last, lo)
                for f in set(stack): incl[f] += dt
                self_[stack[-1]] += dt
                # The managed method whose native call (P/Invoke into libtorch, a kernel launch) the time is spent in.
                managed = [f for f in stack if names[f] not in ("UNMANAGED_CODE_TIME", "CPU_TIME")]
                if managed: leaf[managed[-1]] += dt
            last = t
            if e["type"] == "O": stack.append(e["frame"])
            else:
                if stack: stack.pop()
        total = max(incl.values(), default=0)
        if total < 50: continue
        print(f"\n== {p['name']}: {total:.0f} ms sampled in the window")
        print("-- inclusive")
        for f, v in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{v:9.1f} ms  {names[f][:170]}")
        print("-- self")
        for f, v in sorted(self_.items(), key=lambda kv: -kv[1])[:top // 2]:
            print(f"{v:9.1f} ms  {names[f][:170]}")
        print("-- by innermost managed method (its own time and the native calls it makes)")
        for f, v in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{v:9.1f} ms  {names[f][:170]}")

if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.5, int(sys.argv[3]) if len(sys.argv) > 3 else 45)
