"""The kernel backends of the fused ops, behind one protocol, registered here and nowhere else.

A backend is a module with::

    NAME: str
    unavailable_reason(x) -> Optional[str]      None when its kernels can run on tensors like ``x``; else why
                                                not and what to do
    conv_bn_act(x, weight, bias, stride, padding, groups, residual, relu, config=()) -> Tensor
    aggregate(children, weight2d, bias, residual, relu, config=()) -> Tensor
    max_pool(x, k) -> Tensor                    k x k, stride k, no padding (the trees' downsampling)
    conv_candidates(x, weight, bias, stride, padding, groups, residual) -> List[config]
    aggregate_candidates(children, weight2d, bias, residual) -> List[config]
    describe(config, op="conv_bn_act") -> str

Arguments arrive validated by :mod:`dla_fast.ops` (or built by :mod:`dla_fast.fuse`): 4-D tensors on one device
in one dtype, the weight channels_last ([Cout, kh, kw, Cin/g] in memory; 2-D for an aggregate), the bias float32
or None, a residual of the output's shape. ``config`` is the backend's own kernel and tile choice, as the
per-layer plan (:mod:`dla_fast.plan`) hands it over: a tuple of ints whose meaning only the backend knows,
``()`` for the backend's built-in rule. ``*_candidates`` list the configs worth timing for one call, the rule's
choice first; every one of them runs the call correctly.

Backends are imported lazily: ``import dla_fast`` never pays for Triton or the CUDA extension.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch

NAMES = ("eager", "triton", "cuda")
_MODULES = {"eager": "dla_fast.backends.eager", "triton": "dla_fast.backends.triton",
            "cuda": "dla_fast.backends.cuda"}
_loaded: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}


def get(name: str):
    """The backend module, or None if it cannot be imported (the reason is kept for :func:`reason_unavailable`)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; the backends are {', '.join(NAMES)}")
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
    """None when backend ``name`` can run on tensors like ``x``; otherwise what is wrong and what to do."""
    mod = get(name)
    if mod is None:
        return f"the {name} backend could not be loaded ({_import_errors[name]})"
    return mod.unavailable_reason(x)


def direct_call(x: torch.Tensor) -> bool:
    """Whether a backend may run its kernels for ``x`` straight from Python rather than through its registered op:
    a plain tensor (no fake or other subclass) outside torch.compile and jit tracing, which see only the ops. The op
    call's dispatch costs microseconds of host time a layer, which at small batches is the forward's time."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def available(x: torch.Tensor) -> Dict[str, Optional[str]]:
    """Every backend's :func:`reason_unavailable` for ``x`` (None = available)."""
    return {n: reason_unavailable(n, x) for n in NAMES}
