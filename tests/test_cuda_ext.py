"""CPU-runnable checks of the CUDA extension's packaging and Python side (no GPU needed).

The extension must import (skipped only when it was not built AND ``DLA_FAST_REQUIRE_EXT`` is unset; CI sets
``DLA_FAST_REQUIRE_EXT=1``), register the ops of ``dla_fast/backends/schema.py`` with those schemas and fake kernels,
and fail soft: a missing or broken ``dla_fast._C`` warns once and lets ``backend="auto"`` fall back. The generated
sources under csrc/ must equal their generators' output.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import dla_fast.backends.cuda as cuda_backend
import dla_fast.ops as ops
from dla_fast.backends import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRE = os.environ.get("DLA_FAST_REQUIRE_EXT", "").strip() not in ("", "0")
FUSED_OPS = tuple(schema.OPS)  # conv_bn_act, aggregate, max_pool


@pytest.fixture
def ext():
    if cuda_backend._C is None:
        msg = f"dla_fast._C is not importable ({cuda_backend._load_error})"
        if REQUIRE:
            pytest.fail(f"DLA_FAST_REQUIRE_EXT=1 but {msg}")
        pytest.skip(f"{msg}; build it with `pip install --no-build-isolation -e .` "
                    "(DLA_FAST_REQUIRE_EXT=1 turns this skip into a failure)")
    return cuda_backend._C


def cl_stride(shape):
    return torch.empty(shape, device="meta", memory_format=torch.channels_last).stride()


def test_extension_imports(ext):
    import dla_fast._C as C  # noqa: F401  (the import itself registers the ops)
    for name in (*schema.OPS, *schema.CUDA_ONLY):
        assert hasattr(torch.ops.dla_fast, name), name
    assert cuda_backend.NAME == "cuda"
    assert isinstance(C.last_kernel(), str)
    # whether the build has the sm_90a (wgmma) kernels; without a 9.x GPU they are never picked
    assert isinstance(C.wgmma_built(), bool)
    if not torch.cuda.is_available():
        assert cuda_backend.has_wgmma() is False


def test_schemas(ext):
    """The extension's schemas are schema.py's text (csrc/ops/schema.h is generated from it), in its namespace."""
    assert schema.NAMESPACES["cuda"] == "dla_fast"
    for name, sig in (*schema.OPS.items(), *schema.CUDA_ONLY.items()):
        assert str(getattr(torch.ops.dla_fast, name).default._schema) == f"dla_fast::{name}{sig}", name


def test_dispatch_keys(ext):
    for name in FUSED_OPS:
        op = f"dla_fast::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta"), op  # from register_fake
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
    for name in schema.CUDA_ONLY:  # plan-time queries on real CUDA tensors: nothing to trace
        op = f"dla_fast::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta"), op
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


CONV_CASES = [
    # N, C, H, W, Cout, k, stride, pad, groups
    (2, 3, 224, 224, 16, 7, 1, 3, 1),
    (2, 16, 224, 224, 32, 3, 2, 1, 1),
    (1, 13, 9, 11, 19, 3, 1, 1, 1),
    (1, 32, 7, 7, 32, 3, 2, 1, 8),
    (4, 64, 1, 1, 1000, 1, 1, 0, 1),
    (3, 20, 5, 8, 40, 1, 2, 0, 4),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_conv_fake_cuda(ext, case, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode
    n, c, h, w, co, k, s, p, g = case
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    with FakeTensorMode():
        x = torch.empty(n, c, h, w, device="cuda", dtype=dtype)  # NCHW on purpose: any input layout
        wt = torch.empty(co, c // g, k, k, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
        b = torch.empty(co, device="cuda")
        r = torch.empty(n, co, ho, wo, device="cuda", dtype=dtype)
        y = torch.ops.dla_fast.conv_bn_act(x, wt, b, [s, s], [p, p], g, r, True, [])
        assert y.device.type == "cuda" and y.dtype == dtype
        assert tuple(y.shape) == (n, co, ho, wo)
        assert y.stride() == cl_stride((n, co, ho, wo))
        assert y.is_contiguous(memory_format=torch.channels_last)
        # via the Python backend module (what dla_fast.ops calls)
        y2 = cuda_backend.conv_bn_act(x, wt, None, (s, s), (p, p), g, None, False, config=(1, 128, 2))
        assert tuple(y2.shape) == (n, co, ho, wo) and y2.stride() == y.stride()
        assert cuda_backend.conv_out_shape(x, wt, (s, s), (p, p)) == (n, co, ho, wo)


@pytest.mark.parametrize("chans", [(64,), (64, 64), (128, 128, 64, 128), (28, 28, 28, 28), (8,) * 8])
def test_aggregate_fake_cuda(ext, chans):
    from torch._subclasses.fake_tensor import FakeTensorMode
    n, h, w, co = 2, 7, 9, 48
    with FakeTensorMode():
        kids = [torch.empty(n, c, h, w, device="cuda", dtype=torch.float16) for c in chans]
        wt = torch.empty(co, sum(chans), device="cuda", dtype=torch.float16)
        y = torch.ops.dla_fast.aggregate(kids, wt, None, None, True, [])
        assert tuple(y.shape) == (n, co, h, w) and y.stride() == cl_stride((n, co, h, w))
        y4 = cuda_backend.aggregate(kids, wt[:, :, None, None], None, None, False, config=(2, 64, 0))
        assert tuple(y4.shape) == (n, co, h, w)


@pytest.mark.parametrize("shape,k", [((2, 64, 56, 56), 2), ((1, 3, 7, 9), 2), ((3, 20, 11, 10), 3),
                                     ((2, 8, 17, 33), 16), ((0, 16, 4, 4), 2), ((2, 16, 9, 9), 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_max_pool_fake_cuda(ext, shape, k, dtype):
    """Floor mode: (H // k, W // k), channels_last strides, whatever the input's layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    n, c, h, w = shape
    with FakeTensorMode():
        x = torch.empty(shape, device="cuda", dtype=dtype)
        for xin in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, ::1, 1:]):
            y = torch.ops.dla_fast.max_pool(xin, k)
            out = (n, c, xin.shape[2] // k, xin.shape[3] // k)
            assert tuple(y.shape) == out and y.stride() == cl_stride(out) and y.dtype == dtype
            assert tuple(cuda_backend.max_pool(xin, k).shape) == out


def test_meta_tensors(ext):
    x = torch.empty(2, 16, 9, 11, device="meta", dtype=torch.float16)
    wt = torch.empty(32, 16, 3, 3, device="meta", dtype=torch.float16)
    y = torch.ops.dla_fast.conv_bn_act(x, wt, None, [2, 2], [1, 1], 1, None, True, [])
    assert tuple(y.shape) == (2, 32, 5, 6) and y.stride() == cl_stride((2, 32, 5, 6))
    a = torch.ops.dla_fast.aggregate([x, x], torch.empty(8, 32, device="meta", dtype=torch.float16), None, None, True,
                                     [])
    assert tuple(a.shape) == (2, 8, 9, 11) and a.stride() == cl_stride((2, 8, 9, 11))
    m = torch.ops.dla_fast.max_pool(x, 2)
    assert tuple(m.shape) == (2, 16, 4, 5) and m.stride() == cl_stride((2, 16, 4, 5))


def test_opcheck_meta(ext):
    """torch.library.opcheck on meta tensors: schema, autograd registration, fake vs "real" (meta), AOT."""
    x = torch.empty(2, 16, 9, 11, device="meta", dtype=torch.float16)
    w = torch.empty(32, 16, 3, 3, device="meta", dtype=torch.float16).to(memory_format=torch.channels_last)
    r = torch.empty(2, 32, 5, 6, device="meta", dtype=torch.float16)
    torch.library.opcheck(torch.ops.dla_fast.conv_bn_act.default, (x, w, None, [2, 2], [1, 1], 1, r, True, []))
    torch.library.opcheck(torch.ops.dla_fast.conv_bn_act.default,
                          (x, w, None, [2, 2], [1, 1], 1, r, True, [1, 64, 2]))
    w2 = torch.empty(24, 32, device="meta", dtype=torch.float16)
    torch.library.opcheck(torch.ops.dla_fast.aggregate.default, ([x, x], w2, None, None, False, [2, 0, 0]))
    torch.library.opcheck(torch.ops.dla_fast.max_pool.default, (x, 2))


def test_fake_under_dynamic_shapes(ext):
    """The fake kernels take symbolic sizes (torch.compile with dynamic=True)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    mode = FakeTensorMode(shape_env=ShapeEnv())
    x = mode.from_tensor(torch.empty(2, 16, 9, 11), symbolic_context=None)
    with mode:
        wt = torch.empty(32, 16, 3, 3).to(memory_format=torch.channels_last)
        y = torch.ops.dla_fast.conv_bn_act(x, wt, None, [2, 2], [1, 1], 1, None, True, [])
        m = torch.ops.dla_fast.max_pool(x, 2)
    assert y.shape[1] == 32 and y.dim() == 4
    assert m.shape[1] == 16 and m.dim() == 4


def test_cpu_tensor_errors(ext):
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(8, 4, 3, 3)
    assert "x is on cpu; the CUDA backend needs CUDA tensors" in cuda_backend.unavailable_reason(x)
    with pytest.raises(RuntimeError, match="x is on cpu; the CUDA backend needs CUDA tensors"):
        ops.conv_bn_act(x, w, padding=1, backend="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ops.aggregate([x, x], torch.randn(8, 8), backend="cuda")
    # the dispatcher itself has no CPU kernel for these ops
    with pytest.raises(NotImplementedError):
        torch.ops.dla_fast.conv_bn_act(x, w, None, [1, 1], [1, 1], 1, None, True, [])
    with pytest.raises(NotImplementedError):
        torch.ops.dla_fast.max_pool(x, 2)
    with pytest.raises(NotImplementedError):
        torch.ops.dla_fast.conv_candidates(x, w, None, [1, 1], [1, 1], 1, None)


def test_direct_entry_points_check_their_arguments(ext):
    """dla_fast._C.conv_bn_act / aggregate / max_pool (the ops without the dispatcher, for eager CUDA calls) refuse
    a wrong argument with a TypeError that names it, and CPU tensors with the op's own message."""
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(8, 4, 3, 3)
    good = (x, w, None, (1, 1), (1, 1), 1, None, True, (0, 0, 0))
    with pytest.raises(RuntimeError, match="x is on cpu; the CUDA backend needs CUDA tensors"):
        ext.conv_bn_act(*good)
    for i, bad, what in [(0, "x", "x must be a tensor"), (2, 3, "bias must be a tensor"),
                         (3, (1, 1, 1), "stride must be a tuple of 2 ints"), (4, 1, "padding must be a tuple of 2"),
                         (5, 1.0, "groups must be an int"), (5, True, "groups must be an int"),
                         (7, "yes", "relu must be a bool"), (8, (1, 2, 0, 0), "config must be a tuple of 0 or 3")]:
        args = list(good)
        args[i] = bad
        with pytest.raises(TypeError, match=re.escape(f"dla_fast._C.conv_bn_act: {what}")):
            ext.conv_bn_act(*args)
    with pytest.raises(TypeError, match="conv_bn_act takes 9 arguments, got 2"):
        ext.conv_bn_act(x, w)
    with pytest.raises(RuntimeError, match=re.escape("config must be [] (the rule) or [family, bn, a_load], got [1")):
        ext.conv_bn_act(*good[:8], (1, 2))  # the op's own check, as through torch.ops
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ext.aggregate([x, x], torch.randn(8, 8), None, None, True, ())
    with pytest.raises(TypeError, match="children must be a list of tensors"):
        ext.aggregate(x, torch.randn(8, 8), None, None, True, ())
    with pytest.raises(TypeError, match="children must be a tensor"):
        ext.aggregate([x, 1], torch.randn(8, 8), None, None, True, ())
    with pytest.raises(TypeError, match="max_pool: k must be an int"):
        ext.max_pool(x, 2.0)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ext.max_pool(x, 2)


def test_direct_calls_only_for_plain_cuda_tensors_run_eagerly(ext):
    """The backend module calls the direct entry points only where nothing needs to see the op: CPU and meta
    tensors, fake tensors and jit tracing keep torch.ops (whose errors and fakes they rely on)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    assert cuda_backend._HAS_DIRECT
    assert not cuda_backend._direct(torch.empty(1)) and not cuda_backend._direct(torch.empty(1, device="meta"))
    with FakeTensorMode():
        assert not cuda_backend._direct(torch.empty(1, device="cuda"))
    from dla_fast.backends import direct_call
    seen = []
    torch.jit.trace(lambda t: seen.append(direct_call(t)) or t * 2, torch.ones(1), check_trace=False)
    assert seen == [False] and direct_call(torch.ones(1))
    # on the CPU both paths refuse alike, the torch.ops one through the dispatcher (no CPU kernel)
    with pytest.raises(NotImplementedError):
        cuda_backend.conv_bn_act(torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3), None, (1, 1), (1, 1), 1, None,
                                 True)


def test_dtype_reason(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(1, 4, 5, 5, device="cuda", dtype=torch.float64)
        why = cuda_backend.unavailable_reason(x)
    assert why is not None and "float64" in why and "float16, bfloat16 and float32" in why
    with FakeTensorMode():
        x = torch.empty(1, 4, 5, 5, device="cuda", dtype=torch.float16)
        assert cuda_backend.unavailable_reason(x) is None


def test_auto_on_cpu_stays_eager_without_warning():
    x = torch.randn(1, 4, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.backend_for("conv_bn_act", x) == "eager"
        y = ops.conv_bn_act(x, torch.randn(8, 4, 3, 3), padding=1)
    assert y.shape == (1, 8, 5, 5)


def test_missing_extension_warns_once(monkeypatch):
    """Simulate a missing/broken _C by patching the loader state of the backend module."""
    monkeypatch.setattr(cuda_backend, "_C", None)
    monkeypatch.setattr(cuda_backend, "_load_error", "ImportError: undefined symbol: _ZN3c10simulated")
    monkeypatch.setattr(cuda_backend, "_warned", False)
    x = torch.randn(1, 4, 5, 5)
    with pytest.warns(RuntimeWarning, match="CUDA backend is unavailable") as rec:
        why = cuda_backend.unavailable_reason(x)
    assert "dla_fast._C" in why and "undefined symbol" in why and "pip install --no-build-isolation" in why
    assert any("pip install --no-build-isolation" in str(r.message) for r in rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second query must not warn again
        assert cuda_backend.unavailable_reason(x) == why
        with pytest.raises(RuntimeError, match=r"dla_fast\._C is not available"):
            ops.conv_bn_act(x, torch.randn(8, 4, 3, 3), padding=1, backend="cuda")
    assert cuda_backend.last_kernel() == ""


def test_import_without_extension_subprocess():
    """`import dla_fast.backends.cuda` must survive a missing _C (blocked via sys.modules) and report it."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["dla_fast._C"] = None          # makes `from .. import _C` raise ImportError
        import torch
        import dla_fast.backends.cuda as cu
        import dla_fast.ops as ops
        assert cu._C is None and "dla_fast._C" in cu._load_error, cu._load_error
        x = torch.randn(1, 4, 5, 5)
        assert ops.backend_for("conv_bn_act", x) == "eager"   # CPU + auto: no query, no warning
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            why1 = cu.unavailable_reason(x)
            why2 = cu.unavailable_reason(x)
        msgs = [str(m.message) for m in w if "CUDA backend is unavailable" in str(m.message)]
        assert len(msgs) == 1, msgs
        assert why1 == why2 and "not available" in why1 and "pip install" in why1
        try:
            ops.conv_bn_act(x, torch.randn(8, 4, 3, 3), padding=1, backend="cuda")
        except RuntimeError as e:
            assert "dla_fast._C" in str(e), e
        else:
            raise AssertionError("backend='cuda' without the extension must raise")
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ setup.py helpers (no build happens)
@pytest.fixture(scope="module")
def setup_mod():
    spec = importlib.util.spec_from_file_location("dla_fast_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ != "__main__": defines helpers only
    return mod


def test_setup_arch_flags(setup_mod):
    assert setup_mod.arch_flags("80;90") == ["-gencode=arch=compute_80,code=sm_80",
                                             "-gencode=arch=compute_90,code=sm_90"]
    assert setup_mod.arch_flags("90a") == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in setup_mod.arch_flags(setup_mod.DEFAULT_ARCHS)  # wgmma
    assert setup_mod.arch_flags("9.0+PTX") == ["-gencode=arch=compute_90,code=sm_90",
                                               "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(ValueError):
        setup_mod.arch_flags("hopper")


def test_wgmma_kernels_not_serialized(setup_mod, tmp_path):
    """ptxas serialises every wgmma of a kernel (advisory C7515: each waits for the last; nothing else reports it) when
    other code lands between in-flight wgmmas; compile the fp16 wgmma kernels for sm_90a and read its advice."""
    cuda_home = setup_mod.find_cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit")
    from torch.utils.cpp_extension import include_paths
    cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-std=c++17", "--expt-relaxed-constexpr", "-O3",
           *("-I" + d for d in include_paths()), "-I" + os.path.join(cuda_home, "include"),
           "-I" + os.path.join(ROOT, "csrc"), *setup_mod.arch_flags("90a"), "-DDLA_FAST_SM90A", "-Xptxas", "-v", "-c",
           os.path.join(ROOT, "csrc", "instantiations", "igemm_wgmma_f16.cu"), "-o", str(tmp_path / "wg_f16.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "igemm_wgmma_kernel" in log, log[-2000:]  # ptxas -v did report on the kernels
    assert "C7515" not in log, [line for line in log.splitlines() if "C7515" in line]


def test_setup_sources(setup_mod):
    """setup.py compiles every .cpp/.cu of csrc/ops, csrc/kernels and csrc/instantiations, and nothing else."""
    srcs = setup_mod.extension_sources()
    want = []
    for d in ("ops", "kernels", "instantiations"):
        for folder, _, files in os.walk(os.path.join(ROOT, "csrc", d)):
            want += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if f.endswith((".cpp", ".cu"))]
    assert sorted(srcs) == sorted(want) and len(srcs) == 17, srcs  # 5 ops, 5 kernels, 7 generated
    for must in ("ops/registration.cpp", "ops/direct.cpp", "ops/conv_bn_act.cpp", "ops/aggregate.cpp",
                 "ops/max_pool.cpp", "kernels/max_pool.cu", "kernels/rgb_stem_conv.cu",
                 "instantiations/igemm_dispatch.cpp", "instantiations/igemm_wgmma_f16.cu",
                 "instantiations/igemm_tc_aggregate_bf16.cu"):
        assert os.path.join("csrc", *must.split("/")) in srcs, must
    # no source is left loose in csrc/ itself
    assert not [f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith((".cpp", ".cu", ".cuh", ".h"))]
    assert setup_mod.generated_stale() == []


def _fake_toolkit(root):
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "include"))
    open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()
    nvcc = os.path.join(root, "bin", "nvcc")
    with open(nvcc, "w") as f:
        f.write("#!/bin/sh\necho fake\n")
    os.chmod(nvcc, 0o755)
    return root


def test_setup_finds_cuda_home_behind_wrapper(setup_mod, tmp_path, monkeypatch):
    """nvcc on PATH is a wrapper script in a bin/ whose parent is no toolkit (the /usr/local/bin case)."""
    tk = _fake_toolkit(str(tmp_path / "cuda-13.0"))
    wrapdir = tmp_path / "usr_local" / "bin"
    wrapdir.mkdir(parents=True)
    (wrapdir / "nvcc").write_text(f'#!/bin/sh\nexec {tk}/bin/nvcc "$@"\n')
    (wrapdir / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapdir))
    assert setup_mod.find_cuda_home() == tk
    # an explicit, valid CUDA_HOME wins
    other = _fake_toolkit(str(tmp_path / "other"))
    monkeypatch.setenv("CUDA_HOME", other)
    assert setup_mod.find_cuda_home() == other
    # an empty CUDA_HOME counts as unset
    monkeypatch.setenv("CUDA_HOME", "")
    assert setup_mod.find_cuda_home() == tk


# ------------------------------------------------------------------ kernel logic on the CPU (no extension needed)
@pytest.fixture(scope="module")
def emulator():
    spec = importlib.util.spec_from_file_location("emulate_tc", os.path.join(ROOT, "csrc", "tools", "emulate_tc.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case", [
    (2, 16, 9, 11, 32, 3, 1, 1, 1),   # vw8, bn32
    (1, 3, 15, 17, 16, 7, 1, 3, 1),   # RGB stem: channel pad -> vw4, bn16
    (2, 13, 5, 7, 19, 3, 1, 1, 1),    # scalar gather, odd Cout
    (1, 200, 3, 5, 300, 1, 1, 0, 1),  # Cout tails
    (2, 64, 6, 6, 64, 3, 1, 1, 4),    # grouped on tensor cores
    (2, 64, 6, 5, 64, 3, 1, 1, 8),    # 8 channels a group: block-diagonal over 32-channel super-groups
    (2, 64, 7, 6, 64, 3, 1, 1, 16),   # 4 channels a group: block-diagonal, 8-byte gather
], ids=lambda c: "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*c))
def test_tc_kernel_emulated_conv(emulator, case):
    """The tensor-core kernel's index logic, emulated thread by thread in float64 (csrc/tools/emulate_tc.py)."""
    err, vw, bn = emulator.check_conv(case, "slice")
    assert err < 1e-9, (case, vw, bn, err)


@pytest.mark.parametrize("chans,cout", [((128, 128, 64, 128), 128), ((28, 28, 28, 28), 72), ((13, 7, 20), 24)])
def test_tc_kernel_emulated_aggregate(emulator, chans, cout):
    err, vw, bn = emulator.check_agg(chans, cout, 5, 3, "tensor", True, "slice")
    assert err < 1e-9, (chans, vw, bn, err)


# ------------------------------------------------------------------ generated sources (no extension needed)
@pytest.fixture(scope="module")
def generated():
    path = os.path.join(ROOT, "csrc", "tools", "_generated.py")
    spec = importlib.util.spec_from_file_location("csrc_generated", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_files_in_sync(generated):
    """schema.h, the per-dtype instantiation units and wgmma_ops.cuh equal what their generators write now."""
    files = {}
    for gen in generated.GENERATORS:
        out = generated.load(gen).render()
        assert out, gen
        for rel in out:
            assert rel not in files, f"{rel} is written by {files.get(rel)} and {gen}"
            files[rel] = gen
    assert {"ops/schema.h", "kernels/wgmma_ops.cuh", "instantiations/igemm_dispatch.cpp",
            "instantiations/igemm_tc_conv_f16.cu", "instantiations/igemm_wgmma_bf16.cu"} <= set(files)
    assert generated.all_stale() == [], "run the generators named: python csrc/tools/<generator>"
    # every file in csrc/instantiations is generated (nothing hand-written hides there)
    inst = {f"instantiations/{f}" for f in os.listdir(os.path.join(ROOT, "csrc", "instantiations"))}
    assert inst == {rel for rel in files if rel.startswith("instantiations/")}


def test_generated_check_reports_stale(generated, tmp_path):
    assert generated.stale({"ops/schema.h": "// not the generated text\n"}) == ["ops/schema.h"]
    assert generated.stale({"no/such/file.h": ""}) == ["no/such/file.h"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "csrc", "tools", "gen_schema.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _c_strings(text: str):
    """The C string constants of a header: adjacent literals joined, in order."""
    out = []
    for block in re.findall(r'((?:"(?:[^"\\]|\\.)*"\s*)+),', text):
        out.append("".join(re.findall(r'"((?:[^"\\]|\\.)*)"', block)))
    return out


def test_schema_header_matches_schema_py():
    with open(os.path.join(ROOT, "csrc", "ops", "schema.h")) as f:
        text = f.read()
    assert _c_strings(text) == [n + sig for n, sig in (*schema.OPS.items(), *schema.CUDA_ONLY.items())]
    assert max(len(line) for line in text.splitlines()) <= 120


def test_plan_encoding_matches_python():
    """The family codes of csrc/ops/plan.h are the ones dla_fast.backends.cuda describes."""
    with open(os.path.join(ROOT, "csrc", "ops", "plan.h")) as f:
        text = f.read()
    enum = dict((int(v), k) for k, v in re.findall(r"\bk(\w+) = (\d+),", text.split("enum Family")[1].split("};")[0]))
    names = {0: "RuleFamily", 1: "Wgmma", 2: "Tc", 3: "Simt", 4: "Direct", 5: "Grouped", 6: "Stem",
             7: "BlockdiagWgmma", 8: "BlockdiagTc"}
    assert enum == names
    assert re.search(r'family_name.*?"rule", "wgmma", "tc", "simt", "direct", "grouped", "stem", "blockdiag-wgmma",\s*'
                     r'"blockdiag-tc"', text, re.S)
    assert cuda_backend.FAMILIES == {1: "wgmma", 2: "tc", 3: "simt", 4: "direct", 5: "grouped", 6: "stem",
                                     7: "blockdiag-wgmma", 8: "blockdiag-tc"}
    fixed = dict(re.findall(r"k(Simt|Direct|Grouped|Stem|Blockdiag)Bn = (\d+)", text))
    assert {k: int(v) for k, v in fixed.items()} == {"Simt": 64, "Direct": 32, "Grouped": 64, "Stem": 16,
                                                      "Blockdiag": 32}
    assert cuda_backend.FIXED_WIDTH == {3: 64, 4: 32, 5: 64, 6: 16, 7: 32, 8: 32}


@pytest.mark.parametrize("config,words", [
    ((), "rule"), ([], "rule"), ((1, 128, 2), "wgmma bn128 tma"), ((1, 64, 1), "wgmma bn64 gather"),
    ((1, 256, 2), "wgmma bn256 tma"), ((2, 32, 1), "tc bn32"), ((3, 64, 1), "simt"), ((4, 32, 1), "direct"),
    ((5, 64, 1), "grouped"), ((6, 16, 1), "stem"), ((7, 32, 1), "blockdiag-wgmma"), ((8, 32, 1), "blockdiag-tc"),
    ((0, 0, 0), "rule"), ((0, 128, 0), "rule bn128"), ((1, 0, 0), "wgmma"), ((0, 0, 1), "rule gather"),
    ((3, 128, 0), "simt bn128"),
])
def test_describe(config, words):
    assert cuda_backend.describe(config) == words


def test_describe_rejects_bad_length():
    with pytest.raises(ValueError, match=r"\(family, bn, a_load\)"):
        cuda_backend.describe((1, 64))
