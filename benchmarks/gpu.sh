#!/usr/bin/env bash
# The GPU work, one subcommand per kind of call (benchmarks/GPU.md has the recipes):
#   bash benchmarks/gpu.sh build                  # install (builds dla_fast._C) + versions and `dla_fast info`
#   bash benchmarks/gpu.sh test [pytest args]     # the test suite (default: tests), xdist over the GPU(s)
#   bash benchmarks/gpu.sh sanitize [opbench args]  # compute-sanitizer over `opbench.py --sanitize`
#   bash benchmarks/gpu.sh opbench [opbench args] # per-op times of the layer shapes: .json, .md, .csv
#   bash benchmarks/gpu.sh e2e [bench args]       # python -m dla_fast bench ... --json, then report.py
#   bash benchmarks/gpu.sh det HxW BATCH "models" "dtypes"  # #17's detection rows, one process per row and impl
#   bash benchmarks/gpu.sh ncu [opbench shape args]  # Nsight Compute of the matching layers' kernels
#   bash benchmarks/gpu.sh profile [args]         # profile_model.py: where a forward's GPU time goes
# Each subcommand builds first when needed (a device call may start on a fresh machine), writes under $OUT
# (at most 8 files come back from the device: each subcommand leaves 1-3, named by NAME where it matters) and
# prints a short summary last. Steps stop at the call's deadline: BUDGET seconds (default 570: the device's
# 600 s per command less time to write the logs and copy them back) counted from GPU_T0 (default: this
# script's start; `export GPU_T0=$(date +%s)` before running several subcommands in one call).
set -uo pipefail
cmd=${1:-}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=${GPU_T0:-$(date +%s)}; BUDGET=${BUDGET:-570}
el() { echo $(( $(date +%s) - T0 )); }
# What an exit status means here: timeout's 124 (the deadline), compute-sanitizer's 9 (--error-exitcode).
why() { case "$1" in 124) echo " (stopped at the deadline)";; 9) echo " (the sanitizer found errors)";; esac; }
# Seconds a step may take: what is left of the budget less MARGIN for what follows it (at least 5).
until_deadline() { local t=$(( BUDGET - $(el) - ${1:-10} )); [ $t -lt 5 ] && t=5; echo $t; }
# setup.py finds nvcc through CUDA_HOME (not on PATH on the device image); one arch, sm_90a (the wgmma kernels
# need the "a" variant), halves the build; 16 parallel nvcc jobs match the 16 cores of a one-GPU machine.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} DLA_FAST_CUDA_ARCHS=${DLA_FAST_CUDA_ARCHS:-90a}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); [ "${NGPU:-0}" -ge 1 ] || NGPU=1
SAN=$CUDA_HOME/bin/compute-sanitizer
NCU=$(command -v ncu || echo "$CUDA_HOME/bin/ncu")

# Before timing host-paced calls: no compile workers left from a warm-up, and the 1-minute load average under a
# quarter of the CPUs, waiting at most $1 seconds: calls paced by their launches issue slower on a loaded host
# (rows keep host_load).
quiet() {
  pkill -f "torch._inductor.compile_worker" 2>/dev/null
  local t=$(date +%s) lim=$(( $(nproc) / 4 )); [ "$lim" -lt 1 ] && lim=1
  while [ $(( $(date +%s) - t )) -lt "$1" ] && \
        awk -v l="$lim" '{exit !($1 > l)}' /proc/loadavg; do sleep 3; done
  echo "== host load $(cut -d' ' -f1 /proc/loadavg) on $(nproc) CPUs after $(( $(date +%s) - t ))s at +$(el)s"
}

build() {
  # Several subcommands may run at once (one per GPU): one builds, the others wait for it.
  exec 9> /tmp/dla_fast_gpu_build.lock; flock 9
  local t=$(date +%s)
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    echo "commit $(git rev-parse --short HEAD 2>/dev/null)"
    python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version())"
  } > "$OUT/env.txt" 2>&1
  # A warm machine keeps the previous call's build: rebuild only when the C++/CUDA sources changed.
  if [ ! -f .gpu_built ] || [ -n "$(find csrc setup.py -newer .gpu_built -print -quit 2>/dev/null)" ]; then
    if python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1; then
      touch .gpu_built
    else
      cp /tmp/build.log "$OUT/build.log"; flock -u 9
      echo "BUILD FAILED after $(( $(date +%s) - t ))s (build.log):"; tail -30 /tmp/build.log; exit 1
    fi
  fi
  python3 -m dla_fast info >> "$OUT/env.txt" 2>&1
  flock -u 9
  echo "== build done in $(( $(date +%s) - t ))s ($(head -1 "$OUT/env.txt"))"
}

case "$cmd" in
build)
  build; cat "$OUT/env.txt" ;;

test)
  build
  log=$OUT/${NAME:-pytest}.log
  # xdist workers each start one thread per core by default: 8 workers x 32 threads starved the CPU-side
  # tests (tests/test_models.py ran 9 tests in 290 s on the 32-core host). One thread per worker.
  export OMP_NUM_THREADS=1
  per=${NPROC:-8}  # workers per GPU: the Triton JIT compiles of the kernel tests are CPU-bound
  if [ "$NGPU" -ge 2 ]; then
    # One pytest whose workers are spread over the GPUs, each worker seeing one of them.
    dist="--dist load"; for g in $(seq 0 $(( NGPU - 1 ))); do dist="$dist --tx ${per}*popen//env:CUDA_VISIBLE_DEVICES=$g"; done
  else
    dist="-n $per"
  fi
  # SIGINT at the deadline, not SIGKILL: pytest then still prints the summary of what ran (-k: the hard stop).
  timeout -s INT -k 20 "$(until_deadline 25)" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short \
    --durations=15 $dist "${@:-tests}" > "$log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" "$log" | head -30
  summary=$(grep -E "[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s" "$log" | tail -1)
  echo "== pytest rc=$rc$(why $rc) at +$(el)s, $NGPU GPU(s) x $per workers: $summary" ;;

sanitize)
  build
  # First without a sanitizer: a mismatch shows in seconds, and the Triton kernels compile here, outside the
  # instrumented runs (which load them from Triton's cache).
  timeout "$(until_deadline)" python3 benchmarks/opbench.py --sanitize "$@" > "$OUT/sanitize.log" 2>&1
  rc=$?; echo "== plain run rc=$rc$(why $rc) at +$(el)s: $(grep '^sanitize:' "$OUT/sanitize.log")"
  grep -E "^FAIL" "$OUT/sanitize.log" | head -20
  tools=${SAN_TOOLS:-memcheck racecheck}; g=0
  for tool in $tools; do
    (
      # memcheck: every tensor its own cudaMalloc, so an out-of-bounds access lands outside any allocation
      # instead of inside a neighbour in the caching allocator's block, where memcheck cannot see it.
      [ "$tool" = memcheck ] && export PYTORCH_NO_CUDA_MEMORY_CACHING=1
      CUDA_VISIBLE_DEVICES=$(( g % NGPU )) timeout "$(until_deadline)" "$SAN" --tool "$tool" --error-exitcode 9 \
        python3 benchmarks/opbench.py --sanitize "$@" > "/tmp/$tool.log" 2>&1
      rc=$?; echo "$tool rc=$rc$(why $rc) at +$(el)s" >> "/tmp/$tool.log"
    ) &
    g=$(( g + 1 ))  # with two GPUs the tools run one per GPU
  done
  wait
  for tool in $tools; do
    { echo "### $tool"; grep -v "^ok " "/tmp/$tool.log" | tail -60; } >> "$OUT/sanitizer.log"
    echo "== $(tail -1 "/tmp/$tool.log"): $(grep -E '^sanitize:|ERROR SUMMARY' "/tmp/$tool.log" | tr '\n' ' ')"
  done ;;

opbench)
  build
  name=${NAME:-opbench}
  # SIGTERM at the deadline: opbench writes the rows measured so far (the CSV says "partial").
  # --train times its own fixed set of kernels: a JSON and the printed table, no .md/.csv
  tables=(--md "$OUT/$name.md" --csv "$OUT/$name.csv")
  case " $* " in *" --train "*) tables=() ;; esac
  timeout "$(until_deadline)" python3 benchmarks/opbench.py "$@" --json "$OUT/$name.json" "${tables[@]}" \
    > "/tmp/$name.txt" 2>&1
  rc=$?
  grep -E "error|Error" "/tmp/$name.txt" | grep -v "rel_err" | head -5
  if [ ${#tables[@]} = 0 ]; then
    cp "/tmp/$name.txt" "$OUT/$name.txt"; tail -40 "/tmp/$name.txt"
    echo "== opbench --train rc=$rc$(why $rc) at +$(el)s: $name.json, $name.txt"
  else
    grep -A30 "^Sum over each model" "$OUT/$name.md" | grep "^|"
    grep -E "^([a-z_]+: [0-9]+ of [0-9]+ rows|geomean|LOSE)" "/tmp/$name.txt" | head -20  # the --ref summary
    echo "== opbench rc=$rc$(why $rc) at +$(el)s: $(( $(grep -vc '^#' "$OUT/$name.csv") - 1 )) rows in $name.csv"
  fi ;;

e2e)
  build
  name=${NAME:-e2e}
  # The end-to-end run builds each implementation in turn in one process, so compiling torch.compile graphs
  # and Triton kernels there would take most of a call. Compiling the same models first in WARM parallel
  # processes (one per model: build, one call) fills Triton's and Inductor's on-disk caches: the timed run then
  # loads them. Their wall times are the cold compile times (warm.log). WARM=0 skips this.
  if [ "${WARM:-6}" -gt 0 ]; then
    # The models and the compile-heavy implementations of this run, from its own arguments.
    read -r models impls < <(python3 - "$@" <<'PY'
import argparse, sys
import dla_fast
from dla_fast import bench
p = argparse.ArgumentParser(add_help=False)
p.add_argument("--model", default="dla34")
p.add_argument("--impl", default=None)
a, _ = p.parse_known_args(sys.argv[1:])
models = dla_fast.list_models() if a.model == "all" else a.model.split(",")
impls = [i for i in (a.impl.split(",") if a.impl else bench.GPU_DEFAULT_IMPLS)
         if any(k in i for k in ("compile", "triton", "auto", "cudagraph"))]
print(",".join(models), ",".join(impls))
PY
)
    if [ -n "$impls" ]; then
      export OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=2  # WARM processes share the cores
      echo "$models" | tr , '\n' | timeout "${WARM_S:-200}" xargs -P "${WARM:-6}" -I{} bash -c \
        't=$(date +%s); python3 -m dla_fast bench "$@" --model {} --impl '"$impls"' --rounds 1 --iters 1 \
           --warmup 1 > /dev/null 2>&1; r=$?; echo "{}: $(( $(date +%s) - t ))s (rc=$r)"' _ "$@" > "$OUT/warm.log" 2>&1
      unset OMP_NUM_THREADS; export TORCHINDUCTOR_COMPILE_THREADS=16
      echo "== warm-up ($impls) done at +$(el)s"
    fi
  fi
  timeout -s INT "$(until_deadline 30)" python3 -m dla_fast bench "$@" --json "$OUT/$name.json" > "/tmp/$name.txt" 2>&1
  rc=$?
  python3 benchmarks/report.py "$OUT/$name.json" --md "$OUT/$name.md" --png "$OUT/$name.png" > /dev/null 2>&1 \
    || echo "report.py failed on $name.json"
  sed '/^### Details/q' "$OUT/$name.md" 2>/dev/null | grep -E "^\| dla" | cut -c1-150 | head -40  # the summary table
  echo "== e2e rc=$rc$(why $rc) at +$(el)s: $(grep -c '"img_per_s"' "$OUT/$name.json" 2>/dev/null) rows in $name.json" ;;

det)
  build
  # The detection rows (features_only): dla_fast's impls tuned in one process per model and dtype, torch.compile
  # in a process of its own (its compile workers in the same process slowed dla_fast's host-paced calls ~25 %),
  # its Inductor cache filled first by parallel warm-up processes. Rows already in $DET_DIR are skipped, so a
  # follow-up call on a warm machine finishes what the deadline cut; each row merges into $OUT at once.
  hw=$1; bs=$2; models=$3; dtypes=$4
  fast=${FAST_IMPLS:-dla_fast_cuda,dla_fast_triton,dla_fast_auto}; comp=${COMPILE_IMPLS:-torch_compile}
  dir=${DET_DIR:-/tmp/det}; mkdir -p "$dir"; name=det-$hw-b$bs
  todo=$(for m in $models; do for d in $dtypes; do [ -s "$dir/$m-$d-$hw-b$bs-compile.json" ] || echo "$m $d"; done; done)
  if [ -n "$todo" ] && [ "${WARM:-8}" -gt 0 ]; then
    echo "$todo" | OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=2 timeout "${WARM_S:-240}" xargs -P "${WARM:-8}" \
      -L 1 bash -c 't=$(date +%s); python3 -m dla_fast bench --features --hw '"$hw"' --batch-size '"$bs"' --model $0 \
        --dtype $1 --impl '"$comp"' --rounds 1 --iters 1 --warmup 1 > /dev/null 2>&1; r=$?; \
        echo "warm $0 $1: $(( $(date +%s) - t ))s rc=$r"' >> "$OUT/$name.log" 2>&1
    echo "== warm-up done at +$(el)s"
    quiet "${QUIET_S:-45}"
  fi
  for m in $models; do for d in $dtypes; do for kind in fast compile; do
    f=$dir/$m-$d-$hw-b$bs-$kind.json; [ -s "$f" ] && continue
    t=$(until_deadline 25); [ "$t" -lt 30 ] && { echo "-- $m $d $kind: no time left"; continue; }
    if [ $kind = fast ]; then args="--impl $fast --tune"; quiet 15 >> "$OUT/$name.log"; else args="--impl $comp"; fi
    timeout -s INT "$t" python3 -m dla_fast bench --features --hw "$hw" --batch-size "$bs" --model "$m" --dtype "$d" \
      $args --json "$f.part" >> "$OUT/$name.log" 2>&1
    rc=$?; [ $rc = 0 ] && mv "$f.part" "$f"
    echo "-- $m $d $kind rc=$rc$(why $rc) at +$(el)s"
    # the tuned rows first: the merged header is the first file's (one ls each: ls sorts its arguments)
    files="$(ls "$dir"/*-"$hw"-b"$bs"-fast.json 2>/dev/null) $(ls "$dir"/*-"$hw"-b"$bs"-compile.json 2>/dev/null)"
    [ -n "$files" ] && python3 benchmarks/report.py $files --merge "$OUT/$name.json" > /dev/null 2>&1
  done; done; done
  python3 benchmarks/report.py "$OUT/$name.json" --md "$OUT/$name.md" > /dev/null 2>&1
  grep -E "^\| dla" "$OUT/$name.md" | cut -c1-150 | head -40
  echo "== det done at +$(el)s: $(grep -c '"img_per_s"' "$OUT/$name.json" 2>/dev/null) rows in $name.json" ;;

ncu)
  build
  # The selected layers run once per implementation (opbench --timer none), each kernel launch profiled with
  # the caches flushed (ncu's default); e.g. --models dla34 --match 'conv 64->64 k3x3 @56x56' --impls cuda triton
  timeout "$(until_deadline 40)" "$NCU" --clock-control none ${NCU_OPTS:---set full} \
    -k "regex:${NCU_KERNELS:-igemm|_conv|conv_|_aggregate|aggregate_|stem}" -c "${NCU_COUNT:-12}" -f -o /tmp/ncurep \
    python3 benchmarks/opbench.py --timer none --no-check --precompile-workers 0 --dtypes float16 "$@" \
    > /tmp/ncu_run.txt 2>&1
  rc=$?
  { grep -v "^==PROF==" /tmp/ncu_run.txt | tail -20; "$NCU" -i /tmp/ncurep.ncu-rep --page details; } > "$OUT/ncu.txt" 2>&1
  "$NCU" -i /tmp/ncurep.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > "$OUT/ncu_src.csv.gz"
  cp /tmp/ncurep.ncu-rep "$OUT/ncu.ncu-rep" 2>/dev/null
  grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Compute \(SM\) Throughput" "$OUT/ncu.txt" | cut -c1-150 | head -60
  echo "== ncu rc=$rc$(why $rc) at +$(el)s" ;;

profile)
  build
  name=${NAME:-profile}
  timeout "$(until_deadline)" python3 benchmarks/profile_model.py "$@" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
  rc=$?
  head -${PROFILE_LINES:-25} "$OUT/$name.txt"
  echo "== profile rc=$rc$(why $rc) at +$(el)s" ;;

*)
  sed -n '2,9p' "$0"; exit 2 ;;
esac
