#!/usr/bin/env bash
# GPU machine, from the repo root (after scripts/gpu/prepare.sh here has published the suites):
#   bash tests/LoRAHub.Reliability.Tests/gpu/oom.sh
# CUDA out of memory in the middle of training (issue 21, part 3): the Llama+LoRA child (TrainChild, model=big) trains 6
# steps with batch 4, then asks for batch 4096 of 1024-token rows, which cannot fit in an H200: the error must say what
# to reduce and name the last checkpoint; the same process then resumes with batch 4 to step 10, and a new process
# resumes from that to step 14. Output: $OUT/oom.log; exit status 1 if a check failed.
set -uo pipefail
source scripts/gpu/env.sh
out="${OUT:-/tmp/lorahub-out}"; mkdir -p "$out"
dir=/tmp/lorahub-oom; rm -rf "$dir"
child() { (cd .publish/tests && dotnet exec --roll-forward Major --depsfile LoRAHub.Reliability.Tests.deps.json \
           --runtimeconfig LoRAHub.Reliability.Tests.runtimeconfig.json LoRAHub.Reliability.Tests.dll "$@"); }
failed=0
{
  echo "== same process: batch 4, then batch 4096 (out of memory), then batch 4 again from the last checkpoint"
  child oom-child "$dir" device=cuda huge-batch=4096 steps=10 || failed=1
  echo "== new process: resume from the last checkpoint with batch 4"
  child train-child "$dir" 14 resume model=big batch=4 device=cuda examples=4096 length=1024 save-every=2 > /tmp/lorahub-oom-2.log 2>&1 || failed=1
  cat /tmp/lorahub-oom-2.log | grep -v '^loss ' ; grep -c '^loss ' /tmp/lorahub-oom-2.log | sed 's/^/steps computed by the new process: /'
  grep -q '^final 14 ' /tmp/lorahub-oom-2.log && grep -q 'resumed from .*checkpoint-000010' /tmp/lorahub-oom-2.log \
    && echo "check ok: a new process resumed from checkpoint 10 and reached step 14" || { echo "check FAIL: new-process resume"; failed=1; }
} 2>&1 | tee "$out/oom.log"
failed=$(( failed || $(grep -c 'check FAIL' "$out/oom.log") > 0 ))
echo "oom: $(grep -c 'check ok' "$out/oom.log") checks ok, $(grep -c 'check FAIL' "$out/oom.log") failed"
exit $failed
