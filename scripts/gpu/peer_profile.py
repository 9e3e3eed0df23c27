"""Runs ../shared/bench/peer_bench.py (copied to .gpu/) with one training step marked for a profiler that captures from an
API call (`ncu --profile-from-start off`): the 5th optimizer step ends the marked range, the 4th starts it, so the range
is one whole timed step (3 warm-up steps first). For kernel-by-kernel comparisons with profile-step.sh; not a benchmark."""
import runpy, sys
import torch

calls = {"n": 0}
_step = torch.optim.AdamW.step

def marked_step(self, *a, **k):
    r = _step(self, *a, **k)
    calls["n"] += 1
    if calls["n"] == 4: torch.cuda.synchronize(); torch.cuda.profiler.start()
    if calls["n"] == 5: torch.cuda.synchronize(); torch.cuda.profiler.stop()
    return r

torch.optim.AdamW.step = marked_step
sys.argv = [".gpu/peer_bench.py"] + sys.argv[1:]
runpy.run_path(".gpu/peer_bench.py", run_name="__main__")
