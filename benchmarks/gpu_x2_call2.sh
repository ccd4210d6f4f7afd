#!/usr/bin/env bash
# Two-GPU call: the whole GPU test suite split over both GPUs (op tests on GPU 0, model tests on GPU 1), then
# on GPU 1 the RGB-stem kernel and the rest of the bf16 op timings. At most 8 files under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash benchmarks/gpu_session.sh build > "$OUT/build_stage.txt" 2>&1; tail -2 "$OUT/build_stage.txt"
t0=$(date +%s)
{ CUDA_VISIBLE_DEVICES=0 timeout 60 python3 benchmarks/segv_repro.py
  if command -v gdb >/dev/null; then
    CUDA_VISIBLE_DEVICES=0 timeout 90 gdb -q -batch -ex run -ex bt --args python3 benchmarks/segv_repro.py 2 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -40
  else echo "no gdb"; fi; } > "$OUT/segv.txt" 2>&1
echo "segv repro done at +$(( $(date +%s) - t0 ))s"; head -30 "$OUT/segv.txt"
( CUDA_VISIBLE_DEVICES=0 timeout ${T0:-420} python3 -m pytest -q -n 8 -p no:cacheprovider -rfE --durations=15 \
    tests/test_ops_cuda.py tests/test_ops_triton.py tests/test_cuda_ext.py tests/test_bad_input.py \
    tests/test_models.py tests/test_bench_tools.py tests/test_auto_table.py > "$OUT/pytest_ops.log" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest_ops.log" ) &
( CUDA_VISIBLE_DEVICES=1 timeout ${T1:-300} python3 -m pytest -q -n 8 -p no:cacheprovider -rfE --durations=15 \
    tests/test_fuse.py > "$OUT/pytest_fuse.log" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest_fuse.log"
  # Orphaned xdist workers of a timed-out run would skew the timings below: kill GPU 1's only.
  for p in $(pgrep -f "xdist|pytest"); do grep -qz "CUDA_VISIBLE_DEVICES=1" /proc/$p/environ 2>/dev/null && kill -9 $p; done
  CUDA_VISIBLE_DEVICES=1 timeout 60 python3 benchmarks/opbench.py --models dla34 --limit 1 --dtypes float16 bfloat16 \
    --impls triton cuda eager cudnn_conv eager_seq --precompile-workers 0 --json "$OUT/opbench_stem.json" \
    > "$OUT/opbench2.log" 2>&1
  left=$(( ${T0:-420} + 20 - ($(date +%s) - t0) ))
  [ $left -gt 40 ] && CUDA_VISIBLE_DEVICES=1 timeout $left python3 benchmarks/opbench.py --models all \
    --dtypes bfloat16 --batch 256 --impls triton cuda eager cudnn_conv eager_seq --warmup 10 --rep 40 \
    --precompile-workers 8 --json "$OUT/opbench_bf16.json" >> "$OUT/opbench2.log" 2>&1 ) &
wait
pkill -9 -f xdist 2>/dev/null
echo "all done at +$(( $(date +%s) - t0 ))s"
for f in pytest_ops pytest_fuse; do echo "== $f"; tail -1 "$OUT/$f.log"; grep -E "passed|failed" "$OUT/$f.log" | tail -1
  grep -E "^(FAILED|ERROR)" "$OUT/$f.log" | head -20; done
grep -E "conv 3->16|rc=" "$OUT/opbench2.log" | head
