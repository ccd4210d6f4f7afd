#!/usr/bin/env bash
# Two-GPU call: build, then the whole GPU test suite (benchmarks/gpu_tests.sh, one pytest per file over both
# GPUs) with compute-sanitizer memcheck + racecheck on the CUDA ops running beside it (correctness only: no
# timing in this call). Files back: pytest_gpu0.log, pytest_gpu1.log, sanitizer.log, env.txt, info.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
OUT=/tmp/sess bash benchmarks/gpu_session.sh build > /tmp/build_stage.txt 2>&1
cp /tmp/sess/env.txt /tmp/sess/info.txt "$OUT/" 2>/dev/null; tail -3 /tmp/build_stage.txt
echo "== build done at +$(el)s"
CUDA_VISIBLE_DEVICES=1 SAN_TIMEOUT=200 bash benchmarks/gpu_sanitizer.sh > "$OUT/sanitizer.log" 2>&1 &
OUT=$OUT DEADLINE=$(( ${BUDGET:-560} - $(el) )) NPROC=${NPROC:-8} bash benchmarks/gpu_tests.sh
wait
grep -E "rc=|failures" "$OUT/sanitizer.log"
echo "== total +$(el)s"
