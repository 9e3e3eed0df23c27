#!/usr/bin/env bash
# GPU machine, from the repo root: bash tests/LoRAHub.Reliability.Tests/gpu/long_run.sh [steps=10000]
# Memory flatness over a long run (issue 21, part 3): the Llama+LoRA child (model=big, 256-token rows, batch 8) trains
# on CUDA with a checkpoint every 1000 steps, printing host RSS and CUDA allocated/reserved bytes every 500 steps.
# Reports growth from step 1000 (after warm-up) to the end. Output: $OUT/long_run.log and $OUT/long_run.tsv.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
steps="${1:-10000}"
dir=/tmp/lorahub-long; rm -rf "$dir"
start=$SECONDS
(cd .publish/tests && dotnet exec --roll-forward Major --depsfile LoRAHub.Reliability.Tests.deps.json \
   --runtimeconfig LoRAHub.Reliability.Tests.runtimeconfig.json LoRAHub.Reliability.Tests.dll \
   train-child "$dir" "$steps" model=big batch=8 device=cuda examples=2000 length=256 save-every=1000 rss-every=500) \
   > "$out/long_run.log" 2>&1
status=$?
echo "long run: $steps steps in $((SECONDS - start)) s (exit status $status)"
awk '$1=="rss"{rss[$2]=$3} $1=="cuda"{alloc[$2]=$3; res[$2]=$4} END{
  print "step\trss_mib\tcuda_alloc_mib\tcuda_reserved_mib";
  for (s in rss) print s "\t" rss[s]/1048576 "\t" alloc[s]/1048576 "\t" res[s]/1048576 | "sort -n" }' "$out/long_run.log" > "$out/long_run.tsv"
cat "$out/long_run.tsv"
awk -v last="$steps" '$1=="rss"{rss[$2]=$3} $1=="cuda"{alloc[$2]=$3; res[$2]=$4} END{
  printf "growth from step 1000 to %d: host RSS %.1f MiB, CUDA allocated %.1f MiB, CUDA reserved %.1f MiB\n",
    last, (rss[last]-rss[1000])/1048576, (alloc[last]-alloc[1000])/1048576, (res[last]-res[1000])/1048576 }' "$out/long_run.log" | tee -a "$out/long_run.tsv"
grep -E '^final ' "$out/long_run.log"
exit $status
