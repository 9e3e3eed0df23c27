#!/usr/bin/env bash
# Session 4's early GPU check (one H200, two lanes on the same GPU: speeds are NOT clean here).
set -uo pipefail
source scripts/gpu/env.sh
L=/tmp/e4; rm -rf $L; mkdir -p $L; final=${OUT:-/tmp/e4-out}; mkdir -p $final
pack() { tar -C $L -czf $final/e4.tgz.tmp . && mv $final/e4.tgz.tmp $final/e4.tgz; }
step() { local secs=$1 name=$2; shift 2; local s=$SECONDS; mkdir -p $L/$name; OUT=$L/$name timeout -k 10 $secs "$@" > $L/$name.log 2>&1; echo "$name: exit $? in $((SECONDS-s)) s" | tee -a $L/steps.txt; pack; }
suites() { cd .publish/tests; export LORAHUB_TEST_DEVICE=cuda; for n in "$@"; do timeout 150 dotnet exec --roll-forward Major --depsfile $n.deps.json --runtimeconfig $n.runtimeconfig.json ../xunit-runner/xunit.console.dll $n.dll -nocolor > $OUT/$n.log 2>&1; grep -E "Total:|\[FAIL\]" $OUT/$n.log; done; }
(which nsys ncu; ls /usr/local/cuda*/bin 2>/dev/null | grep -E "nsys|ncu|nvprof"; ls /opt/nvidia 2>/dev/null) > $L/tools.txt 2>&1
laneA() {
  step 200 fused bash bench/LoRAHub.Bench/gpu-lora-fused.sh
  step 200 ce-packing bash src/Training/bench/ce-and-packing.sh
}
laneB() {
  step 260 checkpoint bash bench/LoRAHub.Bench/gpu-checkpoint.sh
  step 150 suites suites LoRAHub.DoRA.Tests LoRAHub.LoRA.Tests LoRAHub.Distributed.Tests LoRAHub.Training.Tests LoRAHub.Models.Tests
}
laneC() { MATRIX_CASES=tied,trainable_tokens,loftq step 150 matrix-new bash scripts/peft/check_matrix.sh; }
laneA & laneB & laneC & wait
pack; cat $L/steps.txt $L/tools.txt
