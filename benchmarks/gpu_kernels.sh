#!/usr/bin/env bash
# One-GPU kernel-iteration call: build; the CUDA op tests (xdist) with compute-sanitizer memcheck + racecheck
# of the sanitize driver beside them (correctness only); then, with the GPU to itself, opbench of the layer
# shapes (OPBENCH_ARGS; OPBENCH_TC_ARGS: also the CUDA backend forced onto one kernel, OPBENCH_FORCE, default
# tc = mma.sync; or, with OPBENCH_WIDTHS="128 256", onto each wide-tile width: opbench_bn<W>.json; or, with
# OPBENCH_IM2COL="0 1", with each way of loading A on the 64/128-wide tiles: opbench_im2col<v>.json). NCU_ARGS: Nsight Compute of benchmarks/ncu_small_n.py (ncu.txt). Files back: env.txt,
# pytest.log, sanitizer.log, opbench.json, opbench.md, opbench_tc.json; OPBENCH_BS1_ARGS: opbench_bs1.json;
# STOP_ON_FAIL=1: stop after failing tests. TABLE_SOURCES (committed opbench runs under benchmarks/results, oldest first): the auto table rebuilt from
# them plus this call's runs (auto_table.json); E2E_ARGS: `python -m dla_fast bench` with it (e2e.json).
#   OPBENCH_ARGS="--models dla34 dla60 --dtypes float16 bfloat16 --impls cuda triton cudnn_conv eager_seq" \
#     bash benchmarks/gpu_kernels.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
BUDGET=${BUDGET:-570}
OUT=/tmp/sess bash benchmarks/gpu_session.sh build > /tmp/build_stage.txt 2>&1
cp /tmp/sess/env.txt "$OUT/" 2>/dev/null; tail -4 /tmp/build_stage.txt
grep -q "BUILD FAILED" /tmp/build_stage.txt && { cp /tmp/sess/build.log "$OUT/"; exit 1; }
echo "== build done at +$(el)s"
bash benchmarks/gpu_sanitizer.sh > "$OUT/sanitizer.log" 2>&1 &
export OMP_NUM_THREADS=1
timeout ${TEST_S:-240} python3 -m pytest -q -n ${NPROC:-8} -p no:cacheprovider -rfE --tb=short \
  ${TESTS:-tests/test_ops_cuda.py tests/test_cuda_ext.py} > "$OUT/pytest.log" 2>&1
prc=$?; echo "pytest rc=$prc at +$(el)s"; grep -E "passed|failed" "$OUT/pytest.log" | tail -2; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
wait
# STOP_ON_FAIL=1: a kernel change that fails its tests is not worth timing
[ -n "${STOP_ON_FAIL:-}" ] && [ $prc -ne 0 ] && { grep -E "rc=|failures|FAIL" "$OUT/sanitizer.log" | head; exit 1; }
grep -E "rc=|failures|FAIL" "$OUT/sanitizer.log" | head -20
echo "== tests + sanitizer done at +$(el)s"
if [ -n "${OPBENCH_TC_ARGS:-}" ] && [ -z "${OPBENCH_WIDTHS:-}${OPBENCH_IM2COL:-}" ]; then  # the CUDA backend forced onto one kernel family
  DLA_FAST_CUDA_KERNEL=${OPBENCH_FORCE:-tc} timeout $(( BUDGET - $(el) )) python3 benchmarks/opbench.py --batch ${OPBATCH:-256} \
    $OPBENCH_TC_ARGS --impls cuda --json "$OUT/opbench_tc.json" > /tmp/opbench_tc.txt 2>&1
  echo "opbench (${OPBENCH_FORCE:-tc}) rc=$? at +$(el)s"
fi
for bn in ${OPBENCH_WIDTHS:-}; do  # the CUDA backend with the wide-tile width forced (opbench_bn<W>.json)
  DLA_FAST_CUDA_WIDE_BN=$bn timeout $(( BUDGET - $(el) )) python3 benchmarks/opbench.py --batch ${OPBATCH:-256} \
    $OPBENCH_TC_ARGS --impls cuda --json "$OUT/opbench_bn$bn.json" > /tmp/opbench_bn$bn.txt 2>&1
  echo "opbench (width $bn) rc=$? at +$(el)s"
done
for v in ${OPBENCH_IM2COL:-}; do  # the CUDA backend with DLA_FAST_CUDA_IM2COL=v (opbench_im2col<v>.json)
  DLA_FAST_CUDA_IM2COL=$v timeout $(( BUDGET - $(el) )) python3 benchmarks/opbench.py --batch ${OPBATCH:-256} \
    $OPBENCH_TC_ARGS --impls cuda --json "$OUT/opbench_im2col$v.json" > /tmp/opbench_im2col$v.txt 2>&1
  echo "opbench (im2col $v) rc=$? at +$(el)s"
done
if [ -n "${OPBENCH_ARGS:-}" ]; then
  left=$(( BUDGET - $(el) ))
  timeout $left python3 benchmarks/opbench.py --batch ${OPBATCH:-256} $OPBENCH_ARGS --json "$OUT/opbench.json" \
    --md "$OUT/opbench.md" > /tmp/opbench.txt 2>&1; echo "opbench rc=$? at +$(el)s"
  tail -3 /tmp/opbench.txt
fi
if [ -n "${OPBENCH_BS1_ARGS:-}" ]; then  # batch 1, timed by CUDA-graph replay (opbench --timer auto)
  timeout $(( BUDGET - $(el) )) python3 benchmarks/opbench.py --batch 1 $OPBENCH_BS1_ARGS \
    --json "$OUT/opbench_bs1.json" > /tmp/opbench_bs1.txt 2>&1; echo "opbench bs1 rc=$? at +$(el)s"
fi
if [ -n "${NCU_ARGS:-}" ]; then  # e.g. "--shape 32 32 56 3 1 1 --backends cuda cuda:wgmma triton"
  timeout $(( BUDGET - $(el) )) ncu --clock-control none ${NCU_OPTS:---set full} -k regex:"igemm|_conv_gemm|grouped_conv|direct_conv" \
    -f -o /tmp/ncurep python3 benchmarks/ncu_small_n.py $NCU_ARGS > /tmp/ncu_run.txt 2>&1
  echo "ncu rc=$? at +$(el)s"
  { grep -v "^==PROF==" /tmp/ncu_run.txt; ncu -i /tmp/ncurep.ncu-rep --page details; } > "$OUT/ncu.txt" 2>&1
  ncu -i /tmp/ncurep.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > "$OUT/ncu_src.csv.gz"
  grep -E " ran |igemm|_conv_gemm|Duration|L2 Cache Throughput|DRAM Throughput" "$OUT/ncu.txt" | cut -c1-150 | head -60
fi
if [ -n "${TABLE_SOURCES:-}" ]; then  # rebuild the auto table: committed runs (oldest first), then this call's
  srcs=""; for f in $TABLE_SOURCES; do srcs="$srcs benchmarks/results/$f"; done
  for f in opbench.json opbench_bs1.json; do [ -f "$OUT/$f" ] && srcs="$srcs $OUT/$f"; done
  python3 benchmarks/make_auto_table.py $srcs --mixed-cards 2>&1 | tail -3
  cp dla_fast/ops/auto_table.json "$OUT/"
fi
if [ -n "${E2E_ARGS:-}" ]; then  # end to end with the kernels (and table) above
  timeout $(( BUDGET - $(el) )) python3 -m dla_fast bench $E2E_ARGS --json "$OUT/e2e.json" > /tmp/e2e.txt 2>&1
  echo "e2e rc=$? at +$(el)s"; grep -E "^\| dla" /tmp/e2e.txt | cut -c1-100 | head -${E2E_LINES:-60}
fi
echo "== total +$(el)s"
