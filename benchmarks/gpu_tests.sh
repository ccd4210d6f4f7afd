#!/usr/bin/env bash
# The GPU test suite, one pytest run per test file so that a file that runs out of time still leaves every
# other file's summary (a single run that times out reports nothing). With 2 GPUs the files are split over
# them; each run gets DEADLINE (seconds since start) minus what has elapsed. Logs: $OUT/pytest_gpu<i>.log.
#   OUT=... DEADLINE=540 bash benchmarks/gpu_tests.sh
set -uo pipefail
NPROC=${NPROC-8}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; DEADLINE=${DEADLINE:-540}; t0=$(date +%s)
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$ngpu" -ge 2 ] && ngpu=2 || ngpu=1
# Heaviest first (Triton JIT compiles, the all-variant model test) so they start while there is most time.
QUEUE0=${QUEUE0-"tests/test_fuse.py tests/test_ops_cuda.py tests/test_bad_input.py tests/test_auto_table.py"}
QUEUE1=${QUEUE1-"tests/test_ops_triton.py tests/test_cuda_ext.py tests/test_models.py tests/test_bench_tools.py"}
# xdist workers each default to one thread per core: 8 workers x 32 threads starved the CPU-side tests
# (test_models.py ran 9 tests in 290 s on the 32-core host). One thread per worker.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ "$ngpu" = 1 ] && { QUEUE0="$QUEUE0 $QUEUE1"; QUEUE1=""; }
run_queue() {
  local gpu=$1; shift
  for f in "$@"; do
    left=$(( DEADLINE - ($(date +%s) - t0) )); [ $left -lt 20 ] && { echo "== $f: not run (no time left)"; continue; }
    echo "== $f (GPU $gpu, ${left}s left)"
    CUDA_VISIBLE_DEVICES=$gpu timeout $left python3 -m pytest -q ${NPROC:+-n $NPROC} -p no:cacheprovider -rfE \
      --durations=10 --tb=short "$f" 2>&1 | grep -v "PytestBenchmarkWarning\|warner(" | tail -${TAIL:-40}
    echo "== $f rc=${PIPESTATUS[0]}"
  done
}
# GPU_IDS="a b": the physical GPUs the two queues use (default "0 1").
read -r G0 G1 <<< "${GPU_IDS:-0 1}"
run_queue "$G0" $QUEUE0 > "$OUT/pytest_gpu0.log" 2>&1 &
[ -n "$QUEUE1" ] && run_queue "${G1:-1}" $QUEUE1 > "$OUT/pytest_gpu1.log" 2>&1 &
wait
for p in $(pgrep -f xdist); do kill -9 "$p" 2>/dev/null; done
grep -hE "^== .* rc=|passed|failed|^(FAILED|ERROR)" "$OUT"/pytest_gpu*.log | head -60
