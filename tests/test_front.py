"""The fused high-resolution front (stem + level 0 + level 1 in one Triton kernel): the kernel against float64,
the op's validation, the switch, and the model running it.

CPU: the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py), on tiny shapes with
small tiles so that one image has several tiles, edge tiles are partial and the persistent programs take several
items each. GPU (``cuda``-marked): the real sizes, fp16/bf16/fp32/TF32, every candidate tiling, the model under
torch.compile, torch.export and CUDA graphs, and the memory the front saves.

Numerics, as in test_ops_triton.py: IEEE fp32 within 1e-5 (relative Frobenius) of float64; fp16/bf16/TF32 at
most 2x the error of eager PyTorch in that dtype plus a floor of about one rounding of the output, in norm and in
the worst element. Outputs start as NaN (DLA_FAST_TRITON_POISON=1), so an element never written fails.
"""
from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

import dla_fast
import dla_fast.ops as ops
from dla_fast import _env
from dla_fast.ops.reference import front_ref
from dla_fast.verify import FLOOR as MODEL_FLOOR
from dla_fast.verify import RATIO, calibrated_random_weights, randomize_bn, rel_err

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:  # pragma: no cover - triton comes with torch's CUDA builds
    HAS_TRITON = False

DEV = "cpu" if INTERP else ("cuda" if HAS_CUDA else None)
needs_kernels = pytest.mark.skipif(
    not HAS_TRITON or DEV is None,
    reason="no GPU and TRITON_INTERPRET is not set: run with TRITON_INTERPRET=1 to test the kernel in the "
           "CPU interpreter")
needs_cuda = pytest.mark.skipif(not HAS_TRITON or not HAS_CUDA or INTERP,
                                reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

SMALL_DTYPES = [torch.float32, torch.float16] if INTERP else [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float32: 1e-3}  # float32 here = TF32


@pytest.fixture(autouse=True)
def _poison_ieee_and_switch(monkeypatch):
    """NaN-filled outputs, IEEE fp32 unless a test turns TF32 on, DLA_FAST_FRONT unset unless a test sets it."""
    monkeypatch.setenv("DLA_FAST_TRITON_POISON", "1")
    monkeypatch.delenv("DLA_FAST_FRONT", raising=False)
    _env.reload()
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    monkeypatch.undo()
    _env.reload()


def _switch(monkeypatch, value: str) -> None:
    monkeypatch.setenv("DLA_FAST_FRONT", value)
    _env.reload()


# ------------------------------------------------------------------------------------------------ helpers

def _rand(*shape, dtype=torch.float32, device=None, scale=1.0):
    # Random normal, never zeros: a dropped term cannot hide behind zero inputs.
    return (torch.randn(*shape, device=device or DEV, dtype=torch.float32) * scale).to(dtype)


def _rel(a, ref) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _max_err(a, ref) -> float:
    return (a.double() - ref).abs().max().item()


def _check(out, ref64, eager, dtype, tf32=False, what=""):
    assert out.dtype == dtype and out.shape == ref64.shape, what
    assert out.is_contiguous(memory_format=torch.channels_last), f"{what}: output is not channels_last"
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an element left unwritten?)"
    err = _rel(out, ref64)
    scale = ref64.abs().max().item()
    if dtype == torch.float32 and not tf32:
        assert err <= 1e-5, f"{what}: fp32 rel error {err:.3e} > 1e-5"
        assert _max_err(out, ref64) <= 1e-4 * max(scale, 1e-30), f"{what}: worst element too far off"
        return err
    floor = FLOOR[dtype]
    e_eager = _rel(eager, ref64)
    assert err <= 2 * e_eager + floor, f"{what}: rel error {err:.3e} > 2 x eager {e_eager:.3e} + {floor}"
    m, m_eager = _max_err(out, ref64), _max_err(eager, ref64)
    assert m <= 2 * m_eager + floor * scale, \
        f"{what}: worst element error {m:.3e} > 2 x eager {m_eager:.3e} + {floor} x {scale:.3e}"
    return err


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    n, c, h, w = t.shape
    if layout == "nchw":
        return t.contiguous()
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "crop":  # a spatial window of a larger NCHW tensor: no dimension is contiguous with the next
        big = torch.zeros(n, c, h + 3, w + 5, dtype=t.dtype, device=t.device)
        big[:, :, 2:2 + h, 1:1 + w] = t
        return big[:, :, 2:2 + h, 1:1 + w]
    if layout == "chslice":  # a channel slice of a wider channels_last tensor
        big = torch.zeros(n, c + 4, h, w, dtype=t.dtype, device=t.device).contiguous(memory_format=torch.channels_last)
        big[:, 2:2 + c] = t
        return big[:, 2:2 + c]
    raise ValueError(layout)


def _params(cin, c0, c1, dtype, device=None, bias=True):
    """Weights (fan-in scaled) and biases of a front, biases in fp32 as the fused layers keep them."""
    w0 = _rand(c0, cin, 7, 7, dtype=dtype, device=device, scale=(cin * 49) ** -0.5)
    w1 = _rand(c0, c0, 3, 3, dtype=dtype, device=device, scale=(c0 * 9) ** -0.5)
    w2 = _rand(c1, c0, 3, 3, dtype=dtype, device=device, scale=(c0 * 9) ** -0.5)
    bs = [_rand(c, device=device, scale=0.2) if bias else None for c in (c0, c0, c1)]
    return w0, bs[0], w1, bs[1], w2, bs[2]


def _front_case(n, cin, c0, c1, h, w, dtype, *, config=None, layout="cl", bias=True, device=None, tf32=False):
    """The Triton front (a given tile config through the backend, else the public op) against float64."""
    import dla_fast.backends.triton as tb
    device = device or DEV
    x = _layout(_rand(n, cin, h, w, dtype=dtype, device=device), layout)
    w0, b0, w1, b1, w2, b2 = _params(cin, c0, c1, dtype, device, bias)
    if config is None:
        out = ops.front(x, w0, b0, w1, b1, w2, b2, backend="triton")
    else:
        cl = [t.contiguous(memory_format=torch.channels_last) for t in (w0, w1, w2)]
        zero = [torch.zeros(c, device=device) if b is None else b for b, c in ((b0, c0), (b1, c0), (b2, c1))]
        out = tb.front(x, cl[0], zero[0], cl[1], zero[1], cl[2], zero[2], config=tuple(config))
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = front_ref(d(x), d(w0), d(b0), d(w1), d(b1), d(w2), d(b2))
    eager = front_ref(x, w0, b0, w1, b1, w2, b2)
    what = f"front N{n} {cin}->{c0}->{c1} {h}x{w} {dtype} {layout} config={config}"
    return _check(out, ref64, eager, dtype, tf32, what)


# ------------------------------------------------------------------------------------ kernel vs float64
# (TH, TW, BLOCK_M, PROGRAMS, num_warps, num_stages): small tiles so that these tiny images have several tiles,
# partial edge tiles and more items than programs.
_CASES = [
    # n, cin, c0, c1, h, w, config
    (1, 3, 16, 32, 9, 7, (4, 4, 32, 2, 4, 1)),        # batch 1, odd sizes, two tiles
    (2, 3, 16, 32, 13, 11, (4, 4, 32, 3, 4, 1)),      # 8 items over 3 programs
    (1, 1, 8, 20, 6, 10, (3, 5, 16, 2, 4, 1)),        # 1 input channel, 8 and 20 channels (padded), odd tiles
    (2, 3, 16, 32, 1, 1, (4, 4, 32, 2, 4, 1)),        # a 1x1 image: everything is padding but one pixel
    (1, 5, 16, 24, 2, 3, (4, 4, 16, 5, 4, 1)),        # more programs than items
]


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("case", _CASES, ids=[f"{c[0]}x{c[1]}x{c[4]}x{c[5]}-{c[2]}-{c[3]}" for c in _CASES])
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=str)
def test_front_small(case, dtype):
    n, cin, c0, c1, h, w, cfg = case
    _front_case(n, cin, c0, c1, h, w, dtype, config=cfg)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "crop", "chslice"])
def test_front_input_layouts(layout):
    """Inputs are read through their four strides: NCHW, a spatial crop and a channel slice need no copy."""
    _front_case(2, 3, 16, 32, 7, 9, torch.float32, config=(4, 4, 32, 2, 4, 1), layout=layout)


@pytest.mark.interpreter
@needs_kernels
def test_front_op_heuristic_tiles_and_no_bias():
    """The public op with the backend's own tiles, and without biases (zeros are passed)."""
    _front_case(1, 3, 16, 32, 19, 17, torch.float16)
    _front_case(1, 3, 16, 32, 5, 6, torch.float32, bias=False)


@pytest.mark.interpreter
@needs_kernels
def test_front_64bit_offsets(monkeypatch):
    from dla_fast.backends.triton import _front
    monkeypatch.setattr(_front, "_IDX64_THRESHOLD", 64)
    _front_case(2, 3, 16, 32, 7, 5, torch.float32, config=(4, 4, 32, 2, 4, 1))


@pytest.mark.interpreter
@needs_kernels
def test_front_op_compiles_and_passes_opcheck():
    """The registered op traces under torch.compile(fullgraph=True) and passes torch.library.opcheck."""
    import dla_fast.backends.triton as tb
    torch.manual_seed(3)
    x = _rand(1, 3, 7, 6)
    w0, b0, w1, b1, w2, b2 = _params(3, 16, 32, torch.float32)
    w0, w1, w2 = (t.contiguous(memory_format=torch.channels_last) for t in (w0, w1, w2))

    def f(x):
        return tb.front(x, w0, b0, w1, b1, w2, b2)

    expect = f(x)
    for backend in (["eager", "aot_eager"] if INTERP else ["aot_eager", "inductor"]):
        torch._dynamo.reset()
        got = torch.compile(f, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5, msg=f"backend={backend}")
    torch.library.opcheck(torch.ops.dla_fast_triton.front.default, (x, w0, b0, w1, b1, w2, b2, [0]))


@needs_triton
def test_front_schema_is_the_triton_only_one():
    """The op takes exactly the arguments of schema.TRITON_ONLY; the CUDA extension's header leaves it out."""
    import runpy

    import dla_fast.backends.triton  # noqa: F401  (registers the ops)
    from dla_fast.backends.schema import OPS, TRITON_ONLY
    assert not set(TRITON_ONLY) & set(OPS)
    for name, sig in TRITON_ONLY.items():
        assert str(getattr(torch.ops.dla_fast_triton, name).default._schema) == f"dla_fast_triton::{name}{sig}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    header = runpy.run_path(os.path.join(root, "csrc", "tools", "gen_schema.py"))["render"]()["ops/schema.h"]
    assert all(f'"{name}(' not in header for name in TRITON_ONLY)


# ------------------------------------------------------------------------------------------ the op's errors

def _good(device="cpu", dtype=torch.float32):
    x = torch.randn(1, 3, 5, 5, device=device, dtype=dtype)
    return [x, *_params(3, 16, 32, dtype, device)]


def _with(i, value):
    args = _good()
    args[i] = value
    return args


@pytest.mark.parametrize("args,kw,exc,match", [
    (_good(), dict(backend="fast"), ValueError, "backend must be one of"),
    (_with(0, torch.randn(3, 5, 5)), {}, ValueError, "x must be a 4-D"),
    (_with(0, torch.ones(1, 3, 5, 5, dtype=torch.int32)), {}, TypeError, "x must be a floating-point"),
    (_with(0, torch.randn(1, 3, 0, 5)), {}, ValueError, "empty spatial size"),
    (_with(0, torch.randn(1, 4, 5, 5)), {}, ValueError, "x has 4 channels but the stem weight w0"),
    (_with(1, torch.randn(16, 3, 3, 3)), {}, ValueError, "w0 must be a 7x7 kernel"),
    (_with(3, torch.randn(16, 16, 7, 7)), {}, ValueError, "w1 must be a 3x3 kernel"),
    (_with(3, torch.randn(16, 8, 3, 3)), {}, ValueError, r"w1 must map the stem's 16 channels to 16"),
    (_with(5, torch.randn(32, 8, 3, 3)), {}, ValueError, "w2 must take level 0's 16 channels"),
    (_with(1, torch.randn(0, 3, 7, 7)), {}, ValueError, "at least one channel at every step"),
    (_with(5, torch.randn(32, 16, 3, 3, dtype=torch.float64)), {}, ValueError, "w2 has dtype torch.float64"),
    (_with(3, torch.randn(16, 16, 3, 3, device="meta")), {}, ValueError, "w1 is on meta"),
    (_with(4, torch.randn(8)), {}, ValueError, r"b1 must have shape \(16,\) to match the w1's"),
    (_with(6, torch.ones(32, dtype=torch.int64)), {}, TypeError, "b2 must be a floating-point"),
    (_with(2, [0.0] * 16), {}, TypeError, "b0 must be a 1-D tensor"),
])
def test_front_bad_arguments(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        ops.front(*args, **kw)


@needs_kernels
def test_front_backend_refusals():
    args = _good(DEV)
    # more input channels than the kernel stages: triton refuses, auto runs the separate layers
    x9 = torch.randn(1, 9, 5, 5, device=DEV)
    w09 = torch.randn(16, 9, 7, 7, device=DEV)
    with pytest.raises(RuntimeError, match="at most 8 input channels.*backend='auto'"):
        ops.front(x9, w09, *args[2:], backend="triton")
    assert rel_err(ops.front(x9, w09, *args[2:]), front_ref(x9, w09, *args[2:])) < 1e-5
    # autograd: the kernel backends are inference-only
    xg = args[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.front(xg, *args[1:], backend="triton")
    assert ops.front(xg, *args[1:]).requires_grad  # auto: the eager layers, differentiable
    # the CUDA backend needs a GPU
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
            ops.front(*args, backend="cuda")
    # bfloat16 in the interpreter, or a CPU tensor without it
    if INTERP:
        with pytest.raises(RuntimeError, match="does not support bfloat16"):
            ops.front(*_good(dtype=torch.bfloat16), backend="triton")


@needs_triton
def test_front_config_errors(monkeypatch):
    import dla_fast.backends.triton as tb
    from dla_fast.backends.triton import _front
    with pytest.raises(ValueError, match="malformed"):
        _front.config_dict((16, 16, 128))
    with pytest.raises(ValueError, match="BLOCK_M must be a power of two"):
        _front.config_dict((16, 16, 96, 4, 4, 1))
    assert _front.config_dict(_front.config_tuple(_front.front_plan(torch.float16, True, False, 132))) == \
        _front.front_plan(torch.float16, True, False, 132)
    assert _front.describe(()) == "heuristic" and _front.describe((16, 16, 128, 264, 4, 1)).startswith("front 16x16")
    if INTERP:
        args = _good()
        with pytest.raises(ValueError, match=r"config = \[tf32\]"):
            torch.ops.dla_fast_triton.front(*args, [])
        monkeypatch.setattr(_front, "_I32_LIMIT", 1000)
        with pytest.raises(RuntimeError, match="32-bit offsets"):
            tb.front(args[0], *[t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                                for t in args[1:]])


def test_front_eager_and_auto_on_cpu_are_the_reference():
    args = _good()
    ref = front_ref(*args)
    torch.testing.assert_close(ops.front(*args, backend="eager"), ref, rtol=0, atol=0)
    torch.testing.assert_close(ops.front(*args), ref, rtol=0, atol=0)  # auto on the CPU: three eager layers


def test_front_policy(monkeypatch):
    cpu = torch.device("cpu")
    f32 = torch.float32
    assert ops.front_policy("eager", cpu, f32, 3, 16, 32)[0] == "never"
    assert ops.front_policy("cuda", cpu, f32, 3, 16, 32)[0] == "never"
    assert ops.front_policy("auto", cpu, f32, 3, 16, 32) == ("never", "no kernels off the GPU (cpu)")
    when, why = ops.front_policy("triton", cpu, f32, 3, 16, 32)
    if INTERP:
        assert when == "never" and "interpreter" in why  # auto: the interpreter only proves correctness
        _switch(monkeypatch, "1")
        assert ops.front_policy("triton", cpu, f32, 3, 16, 32)[0] == "always"
        assert ops.front_policy("triton", cpu, f32, 3, 64, 32)[0] == "never"  # too wide for the kernel
        assert ops.front_policy("auto", cpu, f32, 3, 16, 32)[0] == "never"   # auto stays eager off the GPU
    _switch(monkeypatch, "0")
    assert ops.front_policy("triton", cpu, f32, 3, 16, 32) == ("never", "DLA_FAST_FRONT=0")
    _switch(monkeypatch, "sometimes")
    with pytest.raises(ValueError, match="DLA_FAST_FRONT='sometimes' is not a front mode"):
        ops.front_policy("triton", cpu, f32, 3, 16, 32)
    with pytest.raises(ValueError, match="not a front mode"):
        dla_fast.optimize(dla_fast.create_model("dla34"), dtype=f32, backend="auto")


# ---------------------------------------------------------------------------------------------- the model

def _level1_model(out_indices=(1,), seed=0):
    """A features_only dla34 that stops at level 1: the model's own path through the front, cheaply."""
    from dla_fast.models.dla import DlaFeatures
    torch.manual_seed(seed)
    return DlaFeatures(randomize_bn(dla_fast.create_model("dla34")), out_indices).eval()


def _count_front_calls(monkeypatch):
    from dla_fast.fuse import FusedFront
    calls = []
    orig = FusedFront.forward
    monkeypatch.setattr(FusedFront, "forward", lambda self, *a: calls.append(1) or orig(self, *a))
    return calls


def test_front_is_built_only_for_a_front_and_the_front_backends(monkeypatch):
    from dla_fast.fuse import FusedFront
    from dla_fast.models.dla import DLA, DlaBasic
    model = dla_fast.create_model("dla34").eval()
    for backend in ("eager", "cuda"):
        if backend == "cuda" and not HAS_CUDA:
            continue
        dev = "cuda" if backend == "cuda" else None
        assert dla_fast.optimize(model, dtype=torch.float32, backend=backend, device=dev).front is None
    fast = dla_fast.optimize(model, dtype=torch.float32)  # auto on the CPU: built, never runs
    assert isinstance(fast.front, FusedFront) and fast.front.when == "never"
    assert fast.front.channels == (3, 16, 32) and "3->16->16->32" in repr(fast)
    assert not any(k.startswith("front") for k in fast.state_dict())
    # two convs in level 0 are not a front: the separate layers run, as before
    odd = randomize_bn(DLA(levels=(1, 2, 1, 1, 1, 1), channels=(16, 32, 64, 64, 64, 64), block=DlaBasic)).eval()
    fodd = dla_fast.optimize(odd, dtype=torch.float32)
    assert fodd.front is None
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fodd(x), odd(x)) < 1e-5
    # a model that stops at level 0 has no level 1 to fuse
    assert dla_fast.optimize(_level1_model(out_indices=(0,)), dtype=torch.float32).front is None


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1")
def test_model_with_the_front_equals_the_model_without(monkeypatch):
    """optimize(backend="triton") with the front gives the separate layers' result (fp32), the maps of level 1
    that forward_intermediates returns included; asking for level 0's map runs the separate layers."""
    calls = _count_front_calls(monkeypatch)
    model = _level1_model(out_indices=(1,))
    x = torch.randn(1, 3, 31, 31)
    _switch(monkeypatch, "0")
    without = dla_fast.optimize(model, dtype=torch.float32, backend="triton")
    assert without.front.when == "never"
    sep = without(x)[0]
    _switch(monkeypatch, "1")
    fast = dla_fast.optimize(model, dtype=torch.float32, backend="triton")
    assert fast.front.when == "always"
    got = fast(x)[0]
    assert len(calls) == 1
    assert got.shape == sep.shape == (1, 32, 16, 16)
    assert rel_err(got, sep) < 1e-6
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())[0]
        eager_err = rel_err(model(x)[0], truth)
    assert rel_err(got, truth) <= RATIO * eager_err + MODEL_FLOOR[torch.float32]
    # level 0 wanted: the three layers, exactly the result without the front
    both = dla_fast.optimize(_level1_model(out_indices=(0, 1)), dtype=torch.float32, backend="triton")
    assert both.front.when == "always"
    maps = both(x)
    assert len(calls) == 1 and len(maps) == 2 and torch.equal(maps[1], sep)
    # the summary says which layers the front runs
    rows = {name: plan for name, _, plan in fast.plans(1, (31, 31))}
    assert {rows[n].source for n in ("base_layer.0", "level0.0", "level1.0")} == {"front"}
    assert "triton [front: DLA_FAST_FRONT=1]" in fast.summary(batch=1, hw=(31, 31))
    assert {p.source for _, _, p in both.plans(1, (31, 31))} == {"requested"}


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1")
def test_model_with_the_front_exports_and_copies(monkeypatch):
    """torch.export keeps the front as one op in place of the three convs (dynamic batch); copies keep it."""
    _switch(monkeypatch, "1")
    fast = dla_fast.optimize(_level1_model(), dtype=torch.float32, backend="triton")
    with torch.no_grad():
        ep = torch.export.export(fast, (torch.randn(2, 3, 31, 31),),
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    names = [n.target.__name__ for n in ep.graph_module.graph.nodes
             if n.op == "call_function" and getattr(n.target, "namespace", None) == "dla_fast_triton"]
    assert names == ["front.default"], names
    for twin in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert twin.front.when == "always" and twin.front is not fast.front
        assert twin.state_dict().keys() == fast.state_dict().keys()


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1")
def test_opbench_front_mode(tmp_path, capsys):
    """``opbench.py --front`` times the front beside the three layers and checks every output (CPU smoke run)."""
    import json
    import sys
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import opbench
    out = tmp_path / "front.json"
    args = ["--front", "--device", "cpu", "--batch", "1", "--hw", "9x7", "--dtypes", "float32", "--warmup", "1",
            "--rep", "1"]
    assert opbench.main(args + ["--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["front (heuristic)", "triton x3", "eager_seq"]
    assert all(r["rel_err"] < 1e-5 and r["ms"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        opbench.main(args + ["--md", str(tmp_path / "x.md")])
    assert "--front times its own fixed set of implementations: drop --md" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- GPU

_GPU_SHAPES = [(2, 224, 224), (1, 225, 199), (3, 63, 65)]


def _dtypes_tf32():
    return [(torch.float16, False), (torch.bfloat16, False), (torch.float32, False), (torch.float32, True)]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype,tf32", _dtypes_tf32(), ids=["fp16", "bf16", "fp32", "tf32"])
@pytest.mark.parametrize("shape", _GPU_SHAPES, ids=[f"{n}x{h}x{w}" for n, h, w in _GPU_SHAPES])
def test_front_cuda(shape, dtype, tf32):
    """Every candidate tiling of the real front (3 -> 16 -> 32) at 224x224, odd sizes and a small map."""
    from dla_fast.backends.triton import _front
    torch.manual_seed(11)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    n, h, w = shape
    for cfg in _front.candidates(dtype, tf32, torch.cuda.get_device_properties(0).multi_processor_count):
        _front_case(n, 3, 16, 32, h, w, dtype, config=cfg, device="cuda", tf32=tf32)
    _front_case(n, 3, 16, 32, h, w, dtype, device="cuda", tf32=tf32, layout="nchw")


@pytest.mark.cuda
@needs_cuda
def test_front_recycled_nan_memory_cuda(monkeypatch):
    """Without the poison switch: output and scratch land in freed NaN-filled blocks; nothing stale is read."""
    monkeypatch.delenv("DLA_FAST_TRITON_POISON")
    _env.reload()
    torch.manual_seed(12)
    x = _rand(4, 3, 64, 64, dtype=torch.float16, device="cuda").contiguous(memory_format=torch.channels_last)
    w0, b0, w1, b1, w2, b2 = _params(3, 16, 32, torch.float16, "cuda")
    for _ in range(3):
        junk = torch.full((64 << 20,), float("nan"), device="cuda", dtype=torch.float16)
        del junk
        y = ops.front(x, w0, b0, w1, b1, w2, b2, backend="triton")
        torch.cuda.synchronize()
        assert torch.isfinite(y).all()


@pytest.mark.cuda
@needs_cuda
def test_front_saves_the_two_full_resolution_maps_cuda():
    """Peak memory of the front: its output and its scratch; the separate layers hold two 224x224 maps."""
    from dla_fast.backends.triton import _front
    torch.manual_seed(13)
    n = 32
    x = _rand(n, 3, 224, 224, dtype=torch.float16, device="cuda").contiguous(memory_format=torch.channels_last)
    args = _params(3, 16, 32, torch.float16, "cuda")
    out_bytes = n * 32 * 112 * 112 * 2
    map_bytes = n * 16 * 224 * 224 * 2

    def extra(f):
        f()  # compile and warm the allocator
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = f()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del y
        return peak

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ws1, wsp = _front.scratch_elements(16, 16, 4, 16)
    scratch = _front.PROGRAMS_PER_SM * sms * wsp * 2
    fused = extra(lambda: ops.front(x, *args, backend="triton"))
    other = "cuda" if dla_fast.backends.reason_unavailable("cuda", x) is None else "eager"
    separate = extra(lambda: ops.front(x, *args, backend=other))
    assert fused <= out_bytes + scratch + (4 << 20), (fused, out_bytes, scratch)
    assert separate >= out_bytes + map_bytes, separate
    assert fused + map_bytes < separate


def _models_cuda(name, dtype, **kw):
    model = calibrated_random_weights(dla_fast.create_model(name).cuda(), seed=3, hw=224).eval()
    return model, dla_fast.optimize(model, dtype=dtype, device="cuda", **kw)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["dla34", "dla60x_c"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_model_front_cuda(name, dtype, monkeypatch):
    """optimize(backend="triton") runs the front on the GPU, within the model criterion of float64, as the model
    without it does; backend="auto" runs it at batch 256 but not at a launch-bound batch 1."""
    calls = _count_front_calls(monkeypatch)
    model, fast = _models_cuda(name, dtype, backend="triton")
    assert fast.front.when == "always"
    x = torch.randn(8, 3, 224, 224, device="cuda")
    truth = dla_fast.verify.reference_output(model, x, "cuda", torch.float64)
    with torch.no_grad():
        eager_err = rel_err(copy.deepcopy(model).to(dtype)(x.to(dtype)), truth)
        got = fast(x)
    assert len(calls) == 1
    assert rel_err(got, truth) <= RATIO * eager_err + MODEL_FLOOR[dtype]
    _switch(monkeypatch, "0")
    _, without = _models_cuda(name, dtype, backend="triton")
    assert without.front.when == "never"
    _switch(monkeypatch, "auto")
    _, auto = _models_cuda(name, dtype)
    # backend="auto": fp16 runs the front at batches not paced by launches; bf16 only through the switch
    assert auto.front.when == ("unpaced" if dtype == torch.float16 else "never")
    _switch(monkeypatch, "1")
    _, auto = _models_cuda(name, dtype)
    assert auto.front.when == "unpaced"
    assert {p.source for n, _, p in auto.plans(256) if n in ("base_layer.0", "level1.0")} == {"front"}
    assert "front" not in {p.source for _, _, p in auto.plans(1, replayed=False)}


@pytest.mark.cuda
@needs_cuda
def test_model_front_compile_export_cuda():
    """torch.compile(fullgraph=True) and torch.export of a model with the front: the op is in the graph."""
    model, fast = _models_cuda("dla34", torch.float16, backend="triton")
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref = fast(x)
        torch._dynamo.reset()
        out = torch.compile(fast, fullgraph=True)(x)
        assert rel_err(out, ref) < 1e-3
        ep = torch.export.export(fast, (x,))
    targets = [str(n.target) for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    assert sum("dla_fast_triton.front" in t for t in targets) == 1, targets
    with torch.no_grad():
        assert rel_err(ep.module()(x), ref) < 1e-3


@pytest.mark.cuda
@needs_cuda
def test_model_front_cuda_graph(monkeypatch):
    """cuda_graph=True with backend="auto" and DLA_FAST_FRONT=1: the front is captured (a replayed batch 1 is not
    launch-bound)."""
    _switch(monkeypatch, "1")
    calls = _count_front_calls(monkeypatch)
    model, g = _models_cuda("dla34", torch.float16, cuda_graph=True)
    fast = dla_fast.optimize(model, dtype=torch.float16, device="cuda")
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.float16)
    y = g(x)
    assert calls, "the front was not captured"
    n = len(calls)
    # The replay (with the front) and the eager batch 1 (launch-bound: the separate layers) each within the model
    # criterion of float64: the two fp16 paths round differently, so neither is the other's reference.
    truth = dla_fast.verify.reference_output(model, x, "cuda", torch.float64)
    with torch.no_grad():
        eager_err = rel_err(copy.deepcopy(model).half()(x), truth)
        separate = fast(x)
    assert len(calls) == n
    for got in (y, separate):
        assert rel_err(got, truth) <= RATIO * eager_err + MODEL_FLOOR[torch.float16]
    y2 = g(x * 2)
    assert not torch.equal(y, y2) and len(calls) == n  # replays launch nothing from Python
