#!/usr/bin/env bash
# Two-GPU end-to-end call: build; fill the compile caches for every timed configuration in parallel processes
# (their per-job times are the cold compile times, kept in warm.log); then each GPU runs its job list with
# nothing else on it. A job is MODELS:DTYPE:BATCH[:IMPLS]; jobs are ';'-separated and run in order.
#   JOBS0="all:float16:1" JOBS1="all:bfloat16:1" bash benchmarks/gpu_e2e.sh
# Files: log.txt, warm.log, e2e_g<gpu>_<n>_<dtype>_bs<batch>.json (each written as its models finish).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/log.txt"; t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
BUDGET=${BUDGET:-575}
DEF_IMPLS=timm_eager,torch_compile,torch_compile_reduce_overhead,dla_fast_triton,dla_fast_cuda,dla_fast_auto,dla_fast_cudagraph
JOBS0=${JOBS0:-all:float16:1}; JOBS1=${JOBS1-all:bfloat16:1}
# One GPU: both job lists run on it, one after the other (caches still filled in parallel: no timing there).
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); G1=1
if [ "${NGPU:-0}" -lt 2 ]; then G1=0; fi
OUT=/tmp/sess bash benchmarks/gpu_session.sh build > /tmp/build_stage.txt 2>&1
cat /tmp/sess/env.txt >> "$LOG"; tail -2 /tmp/build_stage.txt | tee -a "$LOG"; echo "== build done at +$(el)s" | tee -a "$LOG"
export PYTHONUNBUFFERED=1
rm -f /tmp/e2e0.txt /tmp/e2e1.txt  # a warm machine keeps /tmp between calls
warm() {  # gpu, job list
  local g=$1 IFS=';'
  for job in $2; do
    [ -z "$job" ] && continue
    IFS=: read -r models dt bs impls <<< "$job"
    IFS=$' \t\n'
    imp=${impls:-$DEF_IMPLS}; w=$(echo "$imp" | tr ',' '\n' | grep -E "compile|cudagraph|auto|triton" | paste -sd,)
    CUDA_VISIBLE_DEVICES=$g OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=2 python3 benchmarks/warm_caches.py \
      --models $models --dtype $dt --batch $bs --impls $w --workers ${WARM_WORKERS:-7} 2>&1 | grep -v Warning
  done
}
# WARM0/WARM1: the jobs whose caches are filled first (default: all); the others compile in the timed process.
( timeout ${WARM_S:-200} bash -c "$(declare -f warm); DEF_IMPLS=$DEF_IMPLS; warm 0 '${WARM0-$JOBS0}'" > /tmp/warm0.txt 2>&1 ) &
( timeout ${WARM_S:-200} bash -c "$(declare -f warm); DEF_IMPLS=$DEF_IMPLS; warm $G1 '${WARM1-$JOBS1}'" > /tmp/warm1.txt 2>&1 ) &
wait
cat /tmp/warm0.txt /tmp/warm1.txt > "$OUT/warm.log"; echo "== warm done at +$(el)s" | tee -a "$LOG"
run_jobs() {  # gpu, job list
  local g=$1 n=0 IFS=';'
  for job in $2; do
    [ -z "$job" ] && continue
    n=$((n + 1)); IFS=: read -r models dt bs impls <<< "$job"
    IFS=$' \t\n'  # BENCH_ARGS must split on spaces
    left=$(( BUDGET - $(el) )); [ $left -lt 20 ] && break
    CUDA_VISIBLE_DEVICES=$g timeout $left python3 -m dla_fast bench --model $models --dtype $dt --batch-size $bs \
      --impl ${impls:-$DEF_IMPLS} ${BENCH_ARGS:-} --json "$OUT/e2e_g${g}_${n}_${dt}_bs${bs}.json" >> /tmp/e2e$g.txt 2>&1
    echo "== gpu $g job $n ($job) done at +$(el)s" >> "$LOG"
  done
}
if [ $G1 -eq 0 ]; then
  run_jobs 0 "$JOBS0;$JOBS1"; touch /tmp/e2e1.txt
else
  run_jobs 0 "$JOBS0" & run_jobs 1 "$JOBS1" & wait
fi
cat /tmp/e2e0.txt /tmp/e2e1.txt >> "$LOG"
echo "== all done at +$(el)s" | tee -a "$LOG"
grep -hE "^\| dla" /tmp/e2e0.txt /tmp/e2e1.txt | grep -E "cudagraph|reduce_overhead|dla_fast_auto|torch_compile " | cut -c1-120 | head -60
