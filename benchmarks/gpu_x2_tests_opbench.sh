#!/usr/bin/env bash
# Two-GPU call: the GPU test suite on GPU 0 while GPU 1 times every distinct op shape of the 12 variants
# (nothing else runs on GPU 1, so its timings are clean). Logs under $OUT, at most 7 files.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash benchmarks/gpu_session.sh build > "$OUT/build_stage.txt" 2>&1; tail -3 "$OUT/build_stage.txt"
t0=$(date +%s)
( CUDA_VISIBLE_DEVICES=0 timeout ${TEST_TIMEOUT:-470} python3 -m pytest tests -q -n ${NPROC:-10} --durations=15 \
    -p no:cacheprovider -rfE > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.log" ) &
( CUDA_VISIBLE_DEVICES=1 timeout ${BENCH_TIMEOUT:-460} python3 benchmarks/opbench.py --models ${MODELS:-all} \
    --dtypes float16 bfloat16 --batch 256 --impls triton cuda eager cudnn_conv eager_seq --warmup 10 --rep 40 \
    --precompile-workers 12 --json "$OUT/opbench.json" --md "$OUT/opbench.md" > "$OUT/opbench.log" 2>&1
  echo "opbench rc=$?" >> "$OUT/opbench.log" ) &
wait
pkill -9 -f xdist 2>/dev/null
echo "both done at +$(( $(date +%s) - t0 ))s"
tail -2 "$OUT/pytest.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
tail -5 "$OUT/opbench.log"
