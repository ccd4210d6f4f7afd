# Device call 4 (short): the e2e fp16 bs256 rows call 3 ran out of time for, then dla34 batch-1 latency.
set -u
bash benchmarks/gpu_session.sh build > /dev/null 2>&1
timeout 130 python3 -m dla_fast bench --model dla60_res2net,dla60_res2next,dla60x,dla60x_c --dtype float16 --batch-size 256 \
  --rounds 3 --impl timm_eager,torch_compile,dla_fast_triton,dla_fast_cuda,dla_fast_auto --json $OUT/e2e_fp16_bs256_rest.json \
  > $OUT/e2e_fp16_bs256_rest.md 2> $OUT/e2e_fp16_bs256_rest.log; echo "bench rc=$?"
timeout 50 python3 -m dla_fast bench --model dla34 --dtype float16 --batch-size 1 --rounds 7 \
  --impl timm_eager,torch_compile_reduce_overhead,dla_fast_auto,dla_fast_cudagraph \
  --json $OUT/e2e_dla34_bs1.json > $OUT/e2e_dla34_bs1.md 2> $OUT/e2e_dla34_bs1.log; echo "bench1 rc=$?"; tail -6 $OUT/e2e_dla34_bs1.md
