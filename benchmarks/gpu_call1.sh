N=""; python3 -c "import xdist" 2>/dev/null && N="-n 8"
PYTEST_ARGS="$N" TEST_TIMEOUT=330 bash benchmarks/gpu_session.sh tests
GPU_CHECK_BUDGET_S=140 timeout 170 python3 benchmarks/gpu_triton_check.py --no-sweep > $OUT/triton_check.log 2>&1; echo triton_check rc=$?; tail -c 3500 $OUT/triton_check.log
