#!/usr/bin/env bash
# Two-GPU call: build; GPU 0 runs test_fuse.py (the all-variant model tests, Triton JIT heavy: 16 workers)
# and the small files; GPU 1 runs test_ops_cuda.py, test_models.py, test_bench_tools.py, then (on GPU 1
# only, while GPU 0 may still test) the pytest-benchmark op run on dla34's shapes.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
OUT=/tmp/sess bash benchmarks/gpu_session.sh build > /tmp/build_stage.txt 2>&1; tail -3 /tmp/build_stage.txt
echo "== build done at +$(el)s"
export OMP_NUM_THREADS=1
( CUDA_VISIBLE_DEVICES=0 TAIL=80 timeout 420 python3 -m pytest -q -n 16 -p no:cacheprovider -rfE --tb=short \
    --durations=15 tests/test_fuse.py > "$OUT/pytest_fuse.log" 2>&1; echo "fuse rc=$?" >> "$OUT/pytest_fuse.log"
  QUEUE0="tests/test_bad_input.py tests/test_auto_table.py" QUEUE1="" GPU_IDS=0 \
    OUT=/tmp/q0 DEADLINE=$(( 540 - $(el) )) bash benchmarks/gpu_tests.sh > /dev/null 2>&1
  cp /tmp/q0/pytest_gpu0.log "$OUT/pytest_small.log" ) &
QUEUE0="tests/test_ops_cuda.py tests/test_models.py tests/test_bench_tools.py" QUEUE1="" GPU_IDS=1 \
  OUT=/tmp/q1 DEADLINE=$(( 330 - $(el) )) bash benchmarks/gpu_tests.sh > /dev/null 2>&1
cp /tmp/q1/pytest_gpu0.log "$OUT/pytest_ops_cuda_models.log"
echo "== GPU1 tests done at +$(el)s"
left=$(( 545 - $(el) ))
CUDA_VISIBLE_DEVICES=1 DLA_BENCH_MODELS=dla34 DLA_BENCH_ROUNDS=15 timeout $left python3 -m pytest -q -p no:cacheprovider \
  benchmarks/test_bench_ops.py --benchmark-json="$OUT/bench_ops_dla34.json" --benchmark-columns=min,median,rounds \
  > "$OUT/bench_ops.log" 2>&1; echo "bench_ops rc=$? at +$(el)s"
wait
grep -hE "rc=|passed|failed|^(FAILED|ERROR)" "$OUT"/pytest_*.log | head -50; tail -3 "$OUT/bench_ops.log"
echo "== total +$(el)s"
