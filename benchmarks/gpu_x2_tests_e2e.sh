#!/usr/bin/env bash
# Two-GPU call: build; re-run the GPU tests that the last call failed (test_fuse.py on GPU 0; the Triton op
# file and the CUDA real-shape test on GPU 1) while the compile caches warm; then the end to end at batch 256
# for MODELS (fp16 on GPU 0, bf16 on GPU 1), then batch 1 for dla34 (GPU 0) and fp32 (GPU 1) while time
# lasts. Nothing else runs on a GPU while it is timed. Files: pytest_*.log, e2e_*.json, log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/log.txt"; t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
BUDGET=${BUDGET:-575}
MODELS=${MODELS:-dla34,dla46_c,dla46x_c,dla60,dla60x,dla60x_c,dla60_res2net,dla60_res2next}
IM=timm_eager,torch_compile,dla_fast_triton,dla_fast_cuda,dla_fast_auto
OUT=/tmp/sess bash benchmarks/gpu_session.sh build > /tmp/build_stage.txt 2>&1; cp /tmp/sess/env.txt "$OUT/" 2>/dev/null
tail -3 /tmp/build_stage.txt | tee -a "$LOG"; echo "== build done at +$(el)s" | tee -a "$LOG"
export OMP_NUM_THREADS=1
( CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -n 12 -p no:cacheprovider -rfE --tb=short --durations=8 \
    tests/test_fuse.py 2>&1 | grep -v "PytestBenchmarkWarning\|warner(" | tail -60 > "$OUT/pytest_fuse.log" ) &
( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -n 10 -p no:cacheprovider -rfE --tb=short --durations=8 \
    tests/test_ops_triton.py 2>&1 | tail -40 > "$OUT/pytest_ops.log"
  CUDA_VISIBLE_DEVICES=1 timeout 100 python3 -m pytest -q -n 8 -p no:cacheprovider -rfE --tb=short \
    tests/test_ops_cuda.py -k dla_layer_shapes 2>&1 | tail -25 >> "$OUT/pytest_ops.log" ) &
( CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=2 timeout 220 python3 benchmarks/warm_caches.py --models $MODELS \
    --dtype float16 --batch 256 --workers 4 > /tmp/warm0.txt 2>&1
  CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=2 timeout 60 python3 benchmarks/warm_caches.py --models dla34 \
    --dtype float16 --batch 1 --impls torch_compile,torch_compile_reduce_overhead,dla_fast_auto --workers 1 \
    >> /tmp/warm0.txt 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=2 timeout 220 python3 benchmarks/warm_caches.py --models $MODELS \
    --dtype bfloat16 --batch 256 --workers 4 > /tmp/warm1.txt 2>&1 ) &
wait; unset OMP_NUM_THREADS
for p in $(pgrep -f xdist); do kill -9 "$p" 2>/dev/null; done
grep -hE "passed|failed" "$OUT"/pytest_*.log | tee -a "$LOG"; tail -2 /tmp/warm0.txt /tmp/warm1.txt >> "$LOG"
echo "== tests + warm done at +$(el)s" | tee -a "$LOG"
left=$(( BUDGET - $(el) ))
( CUDA_VISIBLE_DEVICES=0 timeout $left python3 -m dla_fast bench --model $MODELS --dtype float16 --batch-size 256 \
    --impl $IM --json "$OUT/e2e_fp16.json" > /tmp/e2e0.txt 2>&1
  echo "== fp16 done at +$(el)s" >> "$LOG"; left=$(( BUDGET - $(el) ))
  CUDA_VISIBLE_DEVICES=0 timeout $left python3 -m dla_fast bench --model dla34 --dtype float16 --batch-size 1 \
    --impl timm_eager,torch_compile,torch_compile_reduce_overhead,dla_fast_auto,dla_fast_cudagraph \
    --rounds 7 --iters 50 --json "$OUT/e2e_bs1.json" > /tmp/e2e2.txt 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout $left python3 -m dla_fast bench --model $MODELS --dtype bfloat16 --batch-size 256 \
    --impl $IM --json "$OUT/e2e_bf16.json" > /tmp/e2e1.txt 2>&1
  echo "== bf16 done at +$(el)s" >> "$LOG"; left=$(( BUDGET - $(el) ))
  CUDA_VISIBLE_DEVICES=1 timeout $left python3 -m dla_fast bench --model dla34,dla60 --dtype float32 \
    --batch-size 256 --impl $IM --json "$OUT/e2e_fp32.json" > /tmp/e2e3.txt 2>&1 ) &
wait
cat /tmp/e2e0.txt /tmp/e2e1.txt /tmp/e2e2.txt /tmp/e2e3.txt >> "$LOG" 2>/dev/null
echo "== e2e done at +$(el)s" | tee -a "$LOG"
grep -hE "^\| dla" /tmp/e2e0.txt /tmp/e2e1.txt /tmp/e2e2.txt /tmp/e2e3.txt 2>/dev/null | grep -E "auto|compile\b|torch_compile |cudagraph|reduce" | cut -c1-150 | head -60
