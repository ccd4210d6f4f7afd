"""Numerical check of ``optimize()`` against timm (or our eager model) with a float64 reference.

The rule: the optimized model's relative error against the float64 output is at most
``RATIO`` x the error of the reference model run eagerly in the same dtype, plus a small floor.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Sequence

import torch
import torch.nn as nn

RATIO = 2.0
FLOOR = {torch.float32: 1e-5, torch.float16: 2.5e-4, torch.bfloat16: 2e-3}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that BN folding (and any BN bug) cannot hide behind
    identity statistics. The one copy: tests, benchmarks and ``verify`` all draw from this."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def calibrated_random_weights(model: nn.Module, seed: int = 0, hw: int = 64) -> nn.Module:
    """Random BN affine parameters, and running statistics measured on a random batch.

    Purely random statistics let activations grow with depth until fp16 overflows in the deeper variants
    (dla102 / dla169 gave inf in timm's own fp16 model); statistics measured on data keep every layer
    normalised, as trained weights do, while BN stays far from the identity.
    """
    randomize_bn(model, seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    x = torch.randn(4, getattr(model, "in_chans", 3), hw, hw, generator=torch.Generator().manual_seed(seed + 7))
    param = next(model.parameters(), None)
    if param is not None:  # calibrate where the model lives (a 224x224 batch of dla169 is slow on a CPU)
        x = x.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
        model.train()
        model(x)
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)
    return model


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def reference_output(model: nn.Module, x: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """``model(x)`` on a copy of the model in ``dtype`` on ``device`` with TF32 off (true fp32 / fp64): the
    yardstick for relative errors, left on ``device``. The model itself is not touched. On the device because
    a CPU forward of the large variants at 224x224 took minutes (fp64) or a minute per model (fp32, bs 256)."""
    m = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            return m(x.to(device=device, dtype=dtype))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def reference_model(name: str, seed: int = 0):
    """(reference model, its source) with random weights: timm's model when timm is installed, else ours."""
    import dla_fast

    torch.manual_seed(seed)
    ours = calibrated_random_weights(dla_fast.create_model(name), seed).eval()
    try:
        import timm
    except ImportError:
        return ours, "dla_fast eager (timm not installed)"
    ref = timm.create_model(name).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref, f"timm {timm.__version__}"


@dataclass
class VerifyRow:
    model: str
    dtype: str
    backend: str
    batch_size: int
    hw: tuple
    err: float
    eager_err: float
    bound: float
    passed: bool
    backends_used: str
    seconds: float


def verify_model(name: str, dtypes: Sequence[torch.dtype], device: str, backend: str = "auto",
                 batch_size: int = 2, hw=(64, 64), seed: int = 0) -> List[VerifyRow]:
    import dla_fast

    t0 = time.perf_counter()
    ref, _ = reference_model(name, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, 3, *hw, generator=g)
    ref64 = reference_output(ref, x, device, torch.float64).cpu()
    rows = []
    for dt in dtypes:
        t1 = time.perf_counter()
        r = ref.to(device=device, dtype=dt).to(memory_format=torch.channels_last)
        xd = x.to(device=device, dtype=dt).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            eager_err = rel_err(r(xd).cpu(), ref64)
        fast = dla_fast.optimize(r, dtype=dt, backend=backend)
        with torch.no_grad():
            err = rel_err(fast(xd).cpu(), ref64)
        used = sorted(set(fast.backends(batch_size, hw).values()))
        bound = RATIO * eager_err + FLOOR[dt]
        rows.append(VerifyRow(name, dtype_name(dt), backend, batch_size, tuple(hw), err, eager_err, bound,
                              err <= bound, "+".join(used), time.perf_counter() - t1 + (t1 - t0) / len(dtypes)))
        del fast, r
    return rows


def verify(models: Sequence[str], dtypes: Sequence[torch.dtype], device: str, backend: str = "auto",
           batch_size: int = 2, hw=(64, 64), log: Callable[[str], None] = print) -> List[VerifyRow]:
    rows = []
    for i, name in enumerate(models):
        for row in verify_model(name, dtypes, device, backend, batch_size, hw):
            rows.append(row)
            log(f"[{i + 1}/{len(models)}] {row.model:<15} {row.dtype:<9} err {row.err:.2e}  "
                f"eager {row.eager_err:.2e}  bound {row.bound:.2e}  {'PASS' if row.passed else 'FAIL'}  "
                f"({row.backends_used}, {row.seconds:.1f}s)")
    return rows


def format_table(rows: List[VerifyRow]) -> str:
    head = "| model | dtype | backend | kernels used | rel err vs fp64 | eager err | bound | result |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r.model} | {r.dtype} | {r.backend} | {r.backends_used} | {r.err:.2e} | "
                     f"{r.eager_err:.2e} | {r.bound:.2e} | {'PASS' if r.passed else 'FAIL'} |")
    return "\n".join(lines)


def rows_as_dicts(rows: List[VerifyRow]) -> List[dict]:
    return [asdict(r) for r in rows]
