"""torch.export and AOTInductor of the optimized model (GPU): the fused ops appear as dla_fast ops in the exported
graph, and the compiled package runs them and equals the Python module."""
import os
import zipfile

import pytest
import torch

import dla_fast
from dla_fast import backends
from helpers import randomize_bn, rel_err

pytestmark = pytest.mark.cuda

NAMESPACES = {"cuda": "dla_fast", "triton": "dla_fast_triton"}


def _available(name):
    if not torch.cuda.is_available():
        return False
    return backends.reason_unavailable(name, torch.empty(0, device="cuda", dtype=torch.float16)) is None


def _fused_calls(fast):
    return sum(1 for _, m in fast.fused_layers() if m.OP in ("conv_bn_act", "aggregate"))


def _dla_nodes(gm, ns):
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == ns:
            out.append(node.target)
    return out


@pytest.fixture(scope="module")
def model():
    return randomize_bn(dla_fast.create_model("dla46_c")).eval()


def _exported(model, backend):
    """(optimized model, input, its output, the exported program) on ``backend``; skips where it cannot run."""
    if not _available(backend):
        pytest.skip(f"the {backend} backend cannot run here")
    fast = dla_fast.optimize(model, dtype=torch.float16, backend=backend, device="cuda")
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        return fast, x, fast(x), torch.export.export(fast, (x,))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_export_keeps_the_fused_ops(model, backend):
    fast, x, ref, ep = _exported(model, backend)
    ops = _dla_nodes(ep.graph_module, NAMESPACES[backend])
    convs = [t for t in ops if t.__name__.startswith(("conv_bn_act", "aggregate"))]
    # The fused front (backend="triton") is one op in place of the stem's, level 0's and level 1's convs.
    front = fast.front is not None and fast.front.when != "never"
    assert sum(t.__name__.startswith("front") for t in ops) == int(front), [str(t) for t in ops]
    assert len(convs) == _fused_calls(fast) - 3 * front, [str(t) for t in ops]
    with torch.no_grad():
        out = ep.module()(x)
    assert rel_err(out, ref) < 1e-3


def test_export_auto_dynamic_batch(model):
    if not (_available("cuda") or _available("triton")):
        pytest.skip("no kernel backend here")
    fast = dla_fast.optimize(model, dtype=torch.float16, device="cuda")
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ep = torch.export.export(fast, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
        for b in (1, 3):
            xb = torch.randn(b, 3, 64, 64, device="cuda", dtype=torch.float16)
            assert rel_err(ep.module()(xb), fast(xb)) < 1e-3
    assert _dla_nodes(ep.graph_module, "dla_fast") or _dla_nodes(ep.graph_module, "dla_fast_triton")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_aoti_package_runs_the_fused_kernels(model, backend, tmp_path):
    fast, x, ref, ep = _exported(model, backend)
    with torch.no_grad():
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp_path, "m.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        out = runner(x)
        out2 = runner(torch.randn_like(x))
    assert rel_err(out, ref) < 1e-3
    assert not torch.equal(out, out2)
    # What the package runs: the extension's ops by name (through AOTInductor's proxy executor), or the Triton
    # kernels compiled into it.
    needle = b"dla_fast::conv_bn_act" if backend == "cuda" else b"_conv_gemm_kernel"
    with zipfile.ZipFile(path) as z:
        assert any(needle in z.read(n) for n in z.namelist()), (needle, z.namelist())
