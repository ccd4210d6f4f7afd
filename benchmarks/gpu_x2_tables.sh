#!/usr/bin/env bash
# Two-GPU call (session 4): build; GPU 0 checks the split-K kernels (the Triton op tests that reach them),
# profiles dla34 at batch 1, then times every distinct layer shape at batch 1 (fp16, bf16); GPU 1 times every
# shape at batch 256 in bf16 (the table lacked 115 of them), then dla34 batch-1 end to end. Each GPU runs
# one timing job at a time. Files: log.txt, pytest_ops.log, prof_*.json, opbench_*.json.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/log.txt"; t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
BUDGET=${BUDGET:-570}
OUT=/tmp/sess bash benchmarks/gpu_session.sh build > /tmp/build_stage.txt 2>&1; cp /tmp/sess/env.txt /tmp/ 2>/dev/null
cat /tmp/sess/env.txt >> "$LOG"; tail -3 /tmp/build_stage.txt | tee -a "$LOG"; echo "== build done at +$(el)s" | tee -a "$LOG"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -n 12 -p no:cacheprovider -rfE --tb=short \
    tests/test_ops_triton.py -k "split_k or dla_shapes or cuda_graph or compile or opcheck or recycled" 2>&1 \
    | tail -40 > "$OUT/pytest_ops.log"
  echo "== ops tests done at +$(el)s" >> "$LOG"
  for be in auto triton cuda; do
    CUDA_VISIBLE_DEVICES=0 timeout 90 python3 benchmarks/profile_model.py --model dla34 --dtype float16 --batch 1 \
      --backend $be --top 12 --json "$OUT/prof_dla34_bs1_$be.json" >> /tmp/prof.txt 2>&1
  done
  echo "== profiles done at +$(el)s" >> "$LOG"
  CUDA_VISIBLE_DEVICES=0 timeout $(( BUDGET - $(el) )) python3 benchmarks/opbench.py --models all \
    --dtypes float16 bfloat16 --batch 1 --impls triton cuda eager --warmup 5 --rep 20 --precompile-workers 8 \
    --json "$OUT/opbench_bs1.json" > /tmp/ob1.txt 2>&1
  echo "== opbench bs1 done at +$(el)s" >> "$LOG" ) &
( CUDA_VISIBLE_DEVICES=1 timeout 330 python3 benchmarks/opbench.py --models all --dtypes bfloat16 --batch 256 \
    --impls triton cuda eager --warmup 10 --rep 30 --precompile-workers 8 --json "$OUT/opbench_bf16_bs256.json" \
    > /tmp/ob256.txt 2>&1
  echo "== opbench bf16 bs256 done at +$(el)s" >> "$LOG"
  CUDA_VISIBLE_DEVICES=1 timeout $(( BUDGET - $(el) )) python3 -m dla_fast bench --model dla34 --dtype float16 \
    --batch-size 1 --impl timm_eager,torch_compile_reduce_overhead,dla_fast_cudagraph --rounds 7 --iters 50 \
    --json "$OUT/e2e_dla34_bs1.json" > /tmp/e2e_bs1.txt 2>&1
  echo "== bs1 e2e done at +$(el)s" >> "$LOG" ) &
wait
for p in $(pgrep -f xdist); do kill -9 "$p" 2>/dev/null; done
{ cat /tmp/prof.txt; tail -5 /tmp/ob1.txt /tmp/ob256.txt; cat /tmp/e2e_bs1.txt; } >> "$LOG" 2>/dev/null
echo "== all done at +$(el)s" | tee -a "$LOG"
tail -3 "$OUT/pytest_ops.log"
grep -E "^(dla34|kernel time)" /tmp/prof.txt
tail -2 /tmp/ob1.txt /tmp/ob256.txt
grep -E "^\| dla34" /tmp/e2e_bs1.txt | head -8
