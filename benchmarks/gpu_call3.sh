# Device call 3: build; GPU tests || cache warm-up (parallel, untimed); then the timed end-to-end runs alone.
set -u
bash benchmarks/gpu_session.sh build
( timeout 190 python3 -m pytest -n 3 -v -p no:cacheprovider -rfE --tb=line tests/test_fuse.py \
    tests/test_ops_cuda.py::test_cpp_errors_are_clear tests/test_ops_cuda.py::test_conv_forced_kernel \
    tests/test_ops_cuda.py::test_torch_compile_fullgraph tests/test_ops_cuda.py::test_cuda_graph_capture_and_replay \
    tests/test_ops_cuda.py::test_opcheck_cuda > $OUT/pytest3.log 2>&1; echo "pytest rc=$?" >> $OUT/pytest3.log ) &
timeout 160 python3 benchmarks/warm_caches.py --models all --dtype float16 --batch 256 --workers 5 > $OUT/warm.log 2>&1
timeout 45 python3 benchmarks/warm_caches.py --models dla34 --dtype float16 --batch 1 --workers 1 \
  --impls torch_compile,torch_compile_reduce_overhead,dla_fast_auto >> $OUT/warm.log 2>&1
wait; pkill -9 -f xdist 2>/dev/null
tail -4 $OUT/warm.log; grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/pytest3.log | cut -c1-250 | head -20
timeout 240 python3 -m dla_fast bench --model all --dtype float16 --batch-size 256 --rounds 5 \
  --impl timm_eager,torch_compile,dla_fast_triton,dla_fast_cuda,dla_fast_auto --json $OUT/e2e_fp16_bs256.json \
  > $OUT/e2e_fp16_bs256.md 2> $OUT/e2e_fp16_bs256.log; echo "bench rc=$?"
timeout 60 python3 -m dla_fast bench --model dla34 --dtype float16 --batch-size 1 --rounds 7 \
  --impl timm_eager,torch_compile,torch_compile_reduce_overhead,dla_fast_triton,dla_fast_cuda,dla_fast_auto,dla_fast_cudagraph \
  --json $OUT/e2e_dla34_bs1.json > $OUT/e2e_dla34_bs1.md 2> $OUT/e2e_dla34_bs1.log; echo "bench1 rc=$?"
cat $OUT/e2e_dla34_bs1.md | tail -9
grep -E "dla_fast_auto|torch_compile \|" $OUT/e2e_fp16_bs256.md | cut -c1-140
DLA_BENCH_MODELS=dla34 DLA_BENCH_DTYPES=float16 DLA_BENCH_ROUNDS=10 timeout 45 python3 -m pytest benchmarks/test_bench_ops.py \
  -q -p no:cacheprovider --benchmark-json=$OUT/ops_pytest_dla34_fp16.json > $OUT/ops_pytest.log 2>&1; echo "op pytest-benchmark rc=$?"; tail -2 $OUT/ops_pytest.log
