#!/usr/bin/env bash
# Two-GPU call (session 4, second): build; GPU 0 runs the Triton op tests and the model tests (split-K, the
# max-pool kernel and the direct launch path are new), then end to end at batch 256 for the variants whose
# table entries changed; GPU 1 measures launch cost, profiles dla34 at batch 1 and times every layer shape at
# batch 1 with the CUDA-graph timer (fp16, bf16). Files: log.txt, pytest_*.log, prof_*.json, opbench_bs1.json,
# e2e_bs256.json.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/log.txt"; t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
BUDGET=${BUDGET:-570}
OUT=/tmp/sess bash benchmarks/gpu_session.sh build > /tmp/build_stage.txt 2>&1
cat /tmp/sess/env.txt >> "$LOG"; tail -3 /tmp/build_stage.txt | tee -a "$LOG"; echo "== build done at +$(el)s" | tee -a "$LOG"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
( CUDA_VISIBLE_DEVICES=0 timeout 170 python3 -m pytest -q -n 12 -p no:cacheprovider -rfE --tb=short \
    tests/test_ops_triton.py 2>&1 | tail -30 > "$OUT/pytest_ops.log"
  echo "== ops tests done at +$(el)s" >> "$LOG"
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -n 12 -p no:cacheprovider -rfE --tb=short \
    tests/test_fuse.py 2>&1 | grep -v "PytestBenchmarkWarning\|warner(" | tail -30 > "$OUT/pytest_fuse.log"
  echo "== fuse tests done at +$(el)s" >> "$LOG"
  for p in $(pgrep -f xdist); do kill -9 "$p" 2>/dev/null; done
  CUDA_VISIBLE_DEVICES=0 timeout $(( BUDGET - $(el) )) python3 -m dla_fast bench --model ${E2E_MODELS:-dla46_c,dla34} \
    --dtype bfloat16,float16 --batch-size 256 --impl dla_fast_triton,dla_fast_cuda,dla_fast_auto \
    --json "$OUT/e2e_bs256.json" > /tmp/e2e256.txt 2>&1
  echo "== e2e bs256 done at +$(el)s" >> "$LOG" ) &
( CUDA_VISIBLE_DEVICES=1 timeout 60 python3 benchmarks/launch_overhead.py > /tmp/launch.txt 2>&1
  for be in auto triton; do
    CUDA_VISIBLE_DEVICES=1 timeout 60 python3 benchmarks/profile_model.py --model dla34 --dtype float16 --batch 1 \
      --backend $be --top 14 --json "$OUT/prof_dla34_bs1_$be.json" >> /tmp/prof.txt 2>&1
  done
  echo "== launch + profiles done at +$(el)s" >> "$LOG"
  CUDA_VISIBLE_DEVICES=1 timeout $(( BUDGET - $(el) )) python3 benchmarks/opbench.py --models all \
    --dtypes float16 bfloat16 --batch 1 --impls triton cuda eager --warmup 3 --rep 10 --precompile-workers 8 \
    --json "$OUT/opbench_bs1.json" > /tmp/ob1.txt 2>&1
  echo "== opbench bs1 done at +$(el)s" >> "$LOG" ) &
wait
for p in $(pgrep -f xdist); do kill -9 "$p" 2>/dev/null; done
{ cat /tmp/launch.txt /tmp/prof.txt; tail -4 /tmp/ob1.txt; cat /tmp/e2e256.txt; } >> "$LOG" 2>/dev/null
echo "== all done at +$(el)s" | tee -a "$LOG"
tail -2 "$OUT"/pytest_*.log; grep -E "^(FAILED|ERROR)" "$OUT"/pytest_*.log | head
cat /tmp/launch.txt; grep -E "^(dla34|kernel time)" /tmp/prof.txt; tail -2 /tmp/ob1.txt
grep -E "^\| dla" /tmp/e2e256.txt | head -12
