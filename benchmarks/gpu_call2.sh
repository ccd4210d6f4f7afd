# Device call 2: build, locate the C++ error-path crash, GPU tests (minus the 1000-case layer matrix), CUDA op check + sanitizers.
set -u
bash benchmarks/gpu_session.sh build
timeout 60 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py::test_cpp_errors_are_clear > $OUT/segv.log 2>&1
echo "segv rc=$?"; grep -n "test_ops_cuda.py\|passed\|failed\|Error" $OUT/segv.log | head -8
timeout 190 python3 -m pytest tests -n 8 -q -p no:cacheprovider -rfE --tb=line \
  -k "not dla_layer and not test_cpp_errors_are_clear" > $OUT/pytest.log 2>&1; echo "pytest rc=$?"
pkill -9 -f xdist 2>/dev/null; sleep 1
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | cut -c1-230 | head -40
timeout 130 python3 benchmarks/gpu_cuda_check.py --time-budget 50 > $OUT/cuda_check.log 2>&1; echo "cuda_check rc=$?"
grep -iE "fail|mismatch|error" $OUT/cuda_check.log | head -15; tail -c 2500 $OUT/cuda_check.log
S=/usr/local/cuda/bin/compute-sanitizer
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 $S --tool memcheck --error-exitcode 9 python3 benchmarks/gpu_cuda_check.py --sanitize > $OUT/memcheck.log 2>&1; echo "memcheck rc=$?"; tail -3 $OUT/memcheck.log
timeout 60 $S --tool racecheck --error-exitcode 9 python3 benchmarks/gpu_cuda_check.py --sanitize > $OUT/racecheck.log 2>&1; echo "racecheck rc=$?"; tail -3 $OUT/racecheck.log
