"""pytest-benchmark micro-benchmarks of the fused ops on the real layer shapes of DLA variants.

One test per (distinct shape, dtype, implementation); the implementations of one shape share a benchmark
group, so pytest-benchmark's table compares them side by side. Inputs and implementations are opbench's own
(``build_case``, ``impl_fn``). The timed function synchronises the GPU, so these are per-call latencies
including launch overhead (no L2 flush); ``opbench.py`` gives the GPU-time medians for full runs.

    pytest benchmarks/test_bench_ops.py --benchmark-json=results/ops.json
    DLA_BENCH_DTYPES=float16 DLA_BENCH_MODELS=dla34 pytest benchmarks/test_bench_ops.py -k agg

Environment: DLA_BENCH_MODELS (default "dla34,dla60"; "all"), DLA_BENCH_DTYPES ("float16,bfloat16"),
DLA_BENCH_BATCH (256), DLA_BENCH_HW (224, or HxW), DLA_BENCH_IMPLS ("triton,cuda,auto,cudnn_conv,eager_seq"),
DLA_BENCH_ROUNDS (20).
"""
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark")

import dla_fast  # noqa: E402
import opbench  # noqa: E402  (benchmarks/ is on sys.path, see conftest.py)
from dla_fast import shapes  # noqa: E402


def _env_list(name, default):
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


MODELS = _env_list("DLA_BENCH_MODELS", "dla34,dla60")
MODELS = dla_fast.list_models() if MODELS == ["all"] else MODELS
DTYPES = _env_list("DLA_BENCH_DTYPES", "float16,bfloat16")
BATCH = int(os.environ.get("DLA_BENCH_BATCH", "256"))
HW = shapes.parse_hw(os.environ.get("DLA_BENCH_HW", "224"))
IMPLS = _env_list("DLA_BENCH_IMPLS", "triton,cuda,auto,cudnn_conv,eager_seq")
ROUNDS = int(os.environ.get("DLA_BENCH_ROUNDS", "20"))
WARMUP_ROUNDS = 5


def _params():
    # Shapes come from the models themselves; the order keeps a shape's implementations adjacent so the input
    # cache below builds each (shape, dtype) once.
    out = []
    for dt in DTYPES:
        for e in shapes.distinct_shapes(MODELS, batch=BATCH, hw=HW):
            for impl in IMPLS:
                out.append(pytest.param(e, dt, impl, id=f"{dt}-{e.shape.ident()}-{impl}"))
    return out


_CACHE = {}


def _case(entry, dtype):
    key = (entry.shape, entry.batch, dtype)
    if key not in _CACHE:
        _CACHE.clear()  # one shape's tensors at a time: the largest are ~0.4 GB each at batch 256
        torch.cuda.empty_cache()
        _CACHE[key] = opbench.build_case(entry.shape, entry.batch, dtype, "cuda")
    return _CACHE[key]


@pytest.mark.cuda
@pytest.mark.parametrize("entry,dtype_name,impl", _params())
def test_op(benchmark, entry, dtype_name, impl):
    dtype = opbench.DTYPES[dtype_name]
    why = opbench.skip_reason(impl, torch.device("cuda"), dtype)
    if why is not None:
        pytest.skip(why)
    case = _case(entry, dtype)
    fn, backend = opbench.impl_fn(case, impl)
    s, n = entry.shape, entry.batch

    def timed():
        fn()
        torch.cuda.synchronize()

    with torch.no_grad():
        out = fn()  # first call compiles / selects algorithms; also a basic sanity check of the output
        torch.cuda.synchronize()
        assert tuple(out.shape) == s.output_shape(n)
        assert torch.isfinite(out).all()
        del out
        benchmark.group = f"{dtype_name} {s.label()}"
        benchmark.extra_info.update({
            "shape": s.label(), "shape_id": s.ident(), "op": s.op, "dtype": dtype_name, "impl": impl,
            "backend": backend, "batch": n, "layers": entry.count, "layer_names": entry.layers,
            "input_shapes": s.input_shapes(n), "weight_shape": list(s.weight_shape),
            "flops": s.flops(n), "min_bytes": s.min_bytes(n, torch.empty(0, dtype=dtype).element_size()),
        })
        benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats:  # absent under --benchmark-disable
        ms = stats.stats.median * 1e3
        benchmark.extra_info.update({"median_ms": ms, **opbench.metrics(s, n, dtype, ms)})
