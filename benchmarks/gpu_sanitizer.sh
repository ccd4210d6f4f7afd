#!/usr/bin/env bash
# compute-sanitizer memcheck + racecheck over the CUDA ops' sanitize driver (benchmarks/gpu_cuda_check.py
# --sanitize: every kernel family forced onto a few small shapes). Prints the tails and "<tool> rc=N" lines;
# SAN_TIMEOUT (s) bounds each tool. Used by gpu_sanitize.sh and gpu_kernels.sh, run beside the tests:
#   bash benchmarks/gpu_sanitizer.sh > "$OUT/sanitizer.log" 2>&1 &
S=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
T=${SAN_TIMEOUT:-240}
echo "### memcheck"; PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$T" "$S" --tool memcheck --error-exitcode 9 \
    python3 benchmarks/gpu_cuda_check.py --sanitize 2>&1 | tail -40; echo "memcheck rc=${PIPESTATUS[0]}"
echo "### racecheck"; timeout "$T" "$S" --tool racecheck --error-exitcode 9 \
    python3 benchmarks/gpu_cuda_check.py --sanitize 2>&1 | tail -8; echo "racecheck rc=${PIPESTATUS[0]}"
