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
from typing import Dict, Optional, Tuple

import torch

_MODULES = {"triton": "dla_fast.backends.triton", "cuda": "dla_fast.backends.cuda"}
_loaded: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}

# Measured on the H100 (benchmarks/results/2026-11-25-h100-*): over the layer shapes of the 12 variants the
# Triton kernels beat the CUDA kernels and the eager sequence in total, so Triton is tried first.
DEFAULT_ORDER = ("triton", "cuda")


def conv_key(weight_shape, stride, padding, groups, dtype: torch.dtype, hw=None) -> tuple:
    """The auto-selection key of a conv_bn_act layer; ``hw`` is its input's (H, W) (None: unknown)."""
    return ("conv_bn_act", tuple(int(v) for v in weight_shape), tuple(int(v) for v in stride),
            tuple(int(v) for v in padding), int(groups), str(dtype).replace("torch.", ""),
            None if hw is None else (int(hw[0]), int(hw[1])))


def aggregate_key(split, cout: int, dtype: torch.dtype, hw=None) -> tuple:
    """The auto-selection key of an aggregation node (per-child channel counts, output channels, input H, W)."""
    return ("aggregate", tuple(int(c) for c in split), int(cout), str(dtype).replace("torch.", ""),
            None if hw is None else (int(hw[0]), int(hw[1])))


def _is_rgb_stem(key) -> bool:
    if key is None or key[0] != "conv_bn_act":
        return False
    (cout, cin_g, kh, kw), stride, padding, groups = key[1], key[2], key[3], key[4]
    return (groups == 1 and cin_g == 3 and cout == 16 and (kh, kw) == (7, 7) and stride == (1, 1)
            and padding == (3, 3))


def auto_preference(key, device: Optional[torch.device] = None, batch: Optional[int] = None,
                    launch_bound: bool = False) -> Tuple[str, ...]:
    """Backends to try, in order, for ``key`` under backend="auto" (before DEFAULT_ORDER).

    A measured per-shape winner from dla_fast/ops/auto_table.json (at the measured batch size nearest
    ``batch``; None: the largest) comes first when the GPU is the kind it was measured on; then fixed rules
    for shapes whose winner does not depend on the card. ``launch_bound``: the host's launch cost, not the
    kernel, decides (small batches without a CUDA graph; see dla_fast.fuse.LAUNCH_BOUND_BATCH): the backends
    with the cheapest launches first.
    """
    if launch_bound:
        return ("cuda", "eager")
    from . import auto_table
    win = auto_table.lookup(key, device, batch)
    if win:
        return (win,)
    if key is not None and key[0] == "conv_bn_act" and key[1][1] < 8 and key[4] == 1:
        # 3-channel inputs: the implicit GEMMs gather them element by element (Triton 5.9 ms vs 3.2 ms for
        # cuDNN's conv at bs 256 fp16, H100). The CUDA backend has a dedicated kernel for the RGB stem;
        # anything else goes to cuDNN (the eager path with the folded bias).
        return ("cuda", "eager") if _is_rgb_stem(key) else ("eager",)
    return ()


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


def select(op: str, backend: str, x: torch.Tensor, needs_grad: bool, key=None, batch: Optional[int] = None,
           launch_bound: bool = False):
    """The backend module to run ``op`` on ``x`` (a batch of ``batch``; None: large; ``launch_bound``: see
    auto_preference), or None for the eager reference."""
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
    for name in auto_preference(key, x.device, batch, launch_bound) + DEFAULT_ORDER:
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
