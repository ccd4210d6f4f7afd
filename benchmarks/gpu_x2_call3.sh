#!/usr/bin/env bash
# Two-GPU call, end to end: build; warm the compile caches (fp16 on GPU 0, bf16 on GPU 1) while the stem
# kernel is timed and its tests run; regenerate the auto table from the committed all-shapes run plus the
# stem timing; then all 12 variants at batch 256, fp16 on GPU 0 and bf16 on GPU 1 (each GPU's rows are
# self-consistent: every implementation of a model runs interleaved on the same GPU). At most 7 files.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/log.txt"
BUDGET=${BUDGET:-520}; t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
OUT=/tmp/sess bash benchmarks/gpu_session.sh build > "$LOG" 2>&1; cat /tmp/sess/build.log >> /tmp/build_full.log 2>/dev/null
echo "== build done at +$(el)s" | tee -a "$LOG"
IM=timm_eager,torch_compile,dla_fast_triton,dla_fast_cuda,dla_fast_auto
( CUDA_VISIBLE_DEVICES=0 timeout 170 python3 benchmarks/warm_caches.py --models all --dtype float16 --batch 256 \
    --workers 6 > /tmp/warm0.txt 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 170 python3 benchmarks/warm_caches.py --models all --dtype bfloat16 --batch 256 \
    --workers 6 > /tmp/warm1.txt 2>&1 ) &
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 -m pytest -q -n 4 -p no:cacheprovider -rfE tests/test_ops_cuda.py \
    -k "cpp_errors or kernel_choice or k7s1p3 or public_api" > "$OUT/pytest_small.log" 2>&1
echo "== small pytest: $(tail -1 "$OUT/pytest_small.log") at +$(el)s" | tee -a "$LOG"
CUDA_VISIBLE_DEVICES=1 timeout 90 python3 benchmarks/opbench.py --models dla34 --limit 1 --dtypes float16 bfloat16 \
    --impls triton cuda eager cudnn_conv eager_seq --precompile-workers 0 --json "$OUT/opbench_stem.json" \
    --md /tmp/stem.md >> "$LOG" 2>&1
cat /tmp/stem.md >> "$LOG"; echo "== stem timed at +$(el)s" | tee -a "$LOG"
python3 benchmarks/make_auto_table.py benchmarks/results/2026-11-25-h100-opbench-all-bs256.json \
    "$OUT/opbench_stem.json" -o dla_fast/ops/auto_table.json 2>&1 | tee -a "$LOG"
cp dla_fast/ops/auto_table.json "$OUT/auto_table.json"
wait; cat /tmp/warm0.txt /tmp/warm1.txt | tail -30 >> "$LOG"; echo "== caches warm at +$(el)s" | tee -a "$LOG"
left=$(( BUDGET - $(el) ))
( CUDA_VISIBLE_DEVICES=0 timeout $left python3 -m dla_fast bench --model all --dtype float16 --batch-size 256 \
    --impl $IM --json "$OUT/e2e_fp16.json" > /tmp/e2e0.txt 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout $left python3 -m dla_fast bench --model all --dtype bfloat16 --batch-size 256 \
    --impl $IM --json "$OUT/e2e_bf16.json" > /tmp/e2e1.txt 2>&1 ) &
wait
cat /tmp/e2e0.txt /tmp/e2e1.txt >> "$LOG"; echo "== e2e done at +$(el)s" | tee -a "$LOG"
grep -E "^\| dla" /tmp/e2e0.txt /tmp/e2e1.txt | head -40 | cut -c1-160
grep -E "conv 3->16" /tmp/stem.md
