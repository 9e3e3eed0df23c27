"""One line per bench run of a GPU script's log: `== label` lines, each followed by the bench's JSON line (or its error).

    python3 scripts/gpu/bench_summary.py LOG [NAME=json_field ...]

prints `label: tokens_per_s …, step … ms, peak … GiB, loss …, host {…}` and, per NAME=field, ` | NAME: value` (the
path or kernel report the script is about, e.g. residual=mlp_residual_kernel). The GPU scripts share it instead of
each carrying its own copy.
"""
import json
import sys

fields = [a.split("=", 1) for a in sys.argv[2:]]
label = ""
for line in open(sys.argv[1]):
    if line.startswith("== "):
        label = line[3:].strip()
        continue
    if not line.startswith("{"):
        print(label, line.strip()[:300])
        continue
    d = json.loads(line)
    extra = "".join(f" | {name}: {d.get(field)}" for name, field in fields)
    print(f'{label}: tokens_per_s {d.get("tokens_per_s")}, step {d.get("step_ms")} ms, peak {d.get("peak_gib")} GiB, '
          f'loss {d.get("loss")}, host {d.get("host_ms")}{extra}')
