#!/usr/bin/env bash
# One device call = one stage. Everything logs under $OUT (fetched back); a short summary prints last.
#   bash benchmarks/gpu_session.sh build   # install (builds dla_fast._C for sm_90a) + `dla_fast info`
#   bash benchmarks/gpu_session.sh tests   # build + the GPU test suite + op checks
#   bash benchmarks/gpu_session.sh bench ARGS...   # build + python -m dla_fast bench ARGS --json $OUT/bench.json
set -uo pipefail
stage=${1:-tests}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
export DLA_FAST_CUDA_ARCHS=${DLA_FAST_CUDA_ARCHS:-90a} TORCHINDUCTOR_COMPILE_THREADS=16
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__,'cudnn',torch.backends.cudnn.version())"
} > "$OUT/env.txt" 2>&1
if [ ! -f .gpu_built ] || [ csrc -nt .gpu_built ]; then
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 && touch .gpu_built \
    || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; }
fi
echo "build done at +$(( $(date +%s) - t0 ))s"
python3 -m dla_fast info 2>&1 | tee "$OUT/info.txt"
case "$stage" in
  tests)
    timeout ${TEST_TIMEOUT:-420} python3 -m pytest tests -q --durations=15 -p no:cacheprovider -rfE ${PYTEST_ARGS:-} \
      > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"
    grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
    grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30 ;;
  bench)
    python3 -m dla_fast bench --json "$OUT/bench.json" "$@" 2> "$OUT/bench.log" | tee "$OUT/bench.md" ;;
  run)
    "$@" ;;
esac
cat "$OUT/env.txt"; echo "total +$(( $(date +%s) - t0 ))s"
