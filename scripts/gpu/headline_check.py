"""Issue 19's targets against one headline.jsonl (scripts/gpu/headline.sh's rows, or a call script's with the same
labels): each ratio from the runs of that file only, the mean where a label ran more than once, and met / not met.

    python3 scripts/gpu/headline_check.py headline.jsonl

Rows it reads (label: what): lora-1b, peer-lora-1b, dora-1b, lora-7b-budget, peer-lora-7b-ckpt, qlora-7b-ckpt,
lora-7b-ckpt, and the 50-step losses lora-50-fused / lora-50-unfused, dora-50-fused / dora-50-unfused. MFU is the bench's
model FLOP/s over the H200's 989 dense bf16 TFLOP/s. A row that did not run is reported missing, never met.
"""
import json
import sys
from collections import defaultdict

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16

def load(path):
    runs = defaultdict(list)
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        if "label" in d:
            runs[d["label"]].append(d)
    return runs

def mean(runs, label, field):
    values = [r[field] for r in runs.get(label, []) if r.get(field) is not None]
    return sum(values) / len(values) if values else None

def main(path):
    runs = load(path)
    tok = lambda label: mean(runs, label, "tokens_per_s")
    checks = []
    def ratio(name, num, den, target):
        a, b = tok(num), tok(den)
        checks.append((name, None if a is None or b is None else a / b, target, f"{a and round(a)} / {b and round(b)}"))
    ratio("LoRA llama-1b / peer", "lora-1b", "peer-lora-1b", 2.5)
    ratio("llama-7b checkpointed / peer", "lora-7b-budget", "peer-lora-7b-ckpt", 2.5)
    ratio("DoRA / our LoRA (llama-1b)", "dora-1b", "lora-1b", 0.95)
    ratio("QLoRA 7b / our LoRA 7b", "qlora-7b-ckpt", "lora-7b-ckpt", 0.95)
    tflops = mean(runs, "lora-1b", "tflops")
    checks.append(("MFU LoRA llama-1b", None if tflops is None else tflops / PEAK_TFLOPS, 0.45, f"{tflops:.1f} TFLOP/s" if tflops is not None else "—"))
    for name, value, target, detail in checks:
        verdict = "missing" if value is None else "met" if value >= target else "NOT met"
        shown = "—" if value is None else f"{value:.3f}"
        print(f"{name:32} {shown:>7}  (≥ {target})  {verdict:8} {detail}")
    for method in ("lora", "dora"):
        fused, unfused = mean(runs, f"{method}-50-fused", "loss"), mean(runs, f"{method}-50-unfused", "loss")
        if fused is None or unfused is None:
            print(f"{method} 50-step losses              missing")
        else:
            print(f"{method} 50-step losses              fused {fused:.6f} vs unfused {unfused:.6f} (Δ {fused - unfused:+.6f})")
    met = all(v is not None and v >= t for _, v, t, _ in checks)
    print("every target above met in this file" if met else "not every target met in this file")
    return 0 if met else 1

if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
