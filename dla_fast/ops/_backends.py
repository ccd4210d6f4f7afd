"""Backend registry and selection for the fused ops.

A backend is a module exposing ``NAME``, ``unavailable_reason(x) -> str | None`` and the two kernels with the
validated signatures::

    conv_bn_act(x, weight_cl, bias_f32, stride, padding, groups, residual, relu) -> Tensor
    aggregate(children, weight2d, bias_f32, residual, relu) -> Tensor

Backends are imported lazily so that ``import dla_fast`` never pays for Triton or the extension.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Optional

import torch

_MODULES = {"triton": "dla_fast.triton", "cuda": "dla_fast._cuda"}
_loaded: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}

# Per-op, per-shape preferences for backend="auto", filled from committed benchmark results
# (dla_fast/ops/auto_table.py). Keys are (op, key) as built by dla_fast.ops; values "cuda"/"triton"/"eager".
try:
    from .auto_table import AUTO_TABLE  # type: ignore
except ImportError:  # pragma: no cover - the table is optional
    AUTO_TABLE = {}

# Measured on the H100 (benchmarks/results/2026-11-25-h100-*): over the dla34/dla60 layer shapes the Triton
# kernels beat the eager sequence in total and the CUDA kernels did not yet, so Triton is tried first.
DEFAULT_ORDER = ("triton", "cuda")


def auto_preference(op: str, key) -> "str | None":
    """A measured per-shape override of DEFAULT_ORDER, or None."""
    pref = AUTO_TABLE.get((op, key))
    if pref:
        return pref
    if op == "conv_bn_act" and key is not None:
        wshape, _stride, groups = key[0], key[1], key[2]
        # The 3-channel stem: both kernels gather it element by element and lost to cuDNN (Triton 5.9 ms vs
        # 3.2 ms eager conv+BN+ReLU at bs 256 fp16); the eager path runs cuDNN's conv with the folded bias.
        if groups == 1 and wshape[1] < 8:
            return "eager"
    return None


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def get(name: str):
    """The backend module, or None if it cannot be imported (the reason is kept for error messages)."""
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as e:  # an ImportError, or a broken extension raising anything at load time
        _import_errors[name] = f"{type(e).__name__}: {e}"
        return None
    _loaded[name] = mod
    return mod


def reason_unavailable(name: str, x: torch.Tensor) -> Optional[str]:
    mod = get(name)
    if mod is None:
        return f"the {name} backend could not be loaded ({_import_errors[name]})"
    return mod.unavailable_reason(x)


def select(op: str, backend: str, x: torch.Tensor, needs_grad: bool, key=None):
    """The backend module to run ``op`` on ``x``, or None for the eager reference."""
    if backend == "eager":
        return None
    if backend in ("triton", "cuda"):
        if needs_grad:
            raise RuntimeError(
                f"backend={backend!r} is inference-only and an input requires grad; wrap the call in "
                "torch.no_grad()/torch.inference_mode(), or use backend='eager' (or 'auto') for autograd")
        why = reason_unavailable(backend, x)
        if why is not None:
            raise RuntimeError(f"{op}: backend={backend!r} cannot run here: {why}")
        return get(backend)
    # auto: kernels only for CUDA inference; everything else is the eager reference.
    if needs_grad or x.device.type != "cuda":
        return None
    pref = auto_preference(op, key)
    order = (pref,) + DEFAULT_ORDER if pref else DEFAULT_ORDER
    for name in order:
        if name == "eager":
            return None
        if reason_unavailable(name, x) is None:
            return get(name)
    return None


def prep_weight(w: torch.Tensor) -> torch.Tensor:
    if w.dim() == 4:
        return w.contiguous(memory_format=torch.channels_last)
    return w.contiguous()


def prep_bias(b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if b is None else b.to(torch.float32).contiguous()
