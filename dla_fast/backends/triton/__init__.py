"""Triton backend of the fused inference ops (``backend="triton"`` in :mod:`dla_fast.ops`).

Implements the backend protocol of :mod:`dla_fast.backends`. The kernels are registered as
``torch.ops.dla_fast_triton.conv_bn_act`` / ``aggregate`` / ``max_pool`` (``torch.library.triton_op``, with the
schemas of :mod:`dla_fast.backends.schema`), which ``torch.compile(fullgraph=True)`` and ``torch.export`` trace
into and CUDA graphs capture. Beyond the protocol, this backend alone has :func:`front`: a DLA's stem, level 0 and
level 1 in one kernel (``torch.ops.dla_fast_triton.front``, see ``_front.py``).

On CPU the kernels run only in Triton's interpreter, which must be switched on with ``TRITON_INTERPRET=1``
before this module is first imported (the interpreter is picked when the kernels are decorated).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ... import backends as _backends

NAME = "triton"

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)

try:
    from . import _launch
    _IMPORT_ERROR: Optional[str] = None
except Exception as e:  # no triton, or a triton too old for these kernels
    _launch = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
# Separately: a Triton that cannot build the front kernel still runs the per-layer ops (and the model the separate
# layers).
try:
    from . import _front
    _FRONT_ERROR: Optional[str] = None
except Exception as e:
    _front = None
    _FRONT_ERROR = f"{type(e).__name__}: {e}"


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(x: torch.Tensor) -> Optional[str]:
    """None if the Triton kernels can run on ``x``; otherwise why not, and what to do about it."""
    if _launch is None:
        return (f"Triton could not be imported ({_IMPORT_ERROR}); install a Triton that matches your PyTorch "
                "(pip install triton) or use backend='eager'")
    if x.dtype not in _SUPPORTED:
        return (f"dtype {x.dtype} is not supported by the Triton kernels (float16, bfloat16 or float32); "
                "cast the inputs or use backend='eager'")
    interp = _launch.interpreted()
    if x.device.type == "cuda":
        if interp:
            return None  # the interpreter runs CUDA tensors too (slowly, through host copies)
        major, minor = torch.cuda.get_device_capability(x.device)
        if major < 7:
            return (f"the GPU has compute capability {major}.{minor}; the Triton kernels need 7.0 or newer; "
                    "use backend='eager'")
        if x.dtype == torch.bfloat16 and major < 8:
            return (f"bfloat16 needs compute capability 8.0+ for Triton's tensor-core path (this GPU is "
                    f"{major}.{minor}); use float16 or backend='eager'")
        return None
    if x.device.type == "cpu":
        if not interp:
            if _interpret_env():
                return ("TRITON_INTERPRET=1 was set after dla_fast.backends.triton was imported, so its kernels were "
                        "compiled for the GPU; set it before the first import (e.g. in the environment) to "
                        "run them on CPU, or use backend='eager'")
            return ("x is on the CPU and the Triton kernels need a CUDA tensor; move the inputs to a GPU "
                    "(.cuda()), use backend='eager' (or 'auto'), or set TRITON_INTERPRET=1 before importing "
                    "dla_fast to run them in Triton's (slow) CPU interpreter")
        if x.dtype == torch.bfloat16:
            return ("the Triton CPU interpreter does not support bfloat16; use float16/float32 on CPU, run on a "
                    "CUDA device, or use backend='eager'")
        return None
    return (f"x is on {x.device}; the Triton kernels run on CUDA devices (or on CPU under TRITON_INTERPRET=1); "
            "use backend='eager'")


def compiled(device: torch.device) -> bool:
    """Whether the kernels run compiled on ``device`` (a CUDA device, no interpreter): where speed can be had."""
    return _launch is not None and device.type == "cuda" and not _launch.interpreted()


def compile_threads() -> int:
    """Threads :func:`compile_ahead` compiles in: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def compile_ahead(runs: Sequence[Callable[[], object]], device: torch.device, threads: Optional[int] = None,
                  warm: Optional[Callable[[object, tuple, dict], None]] = None) -> int:
    """Compile the kernels that ``runs`` (calls of this backend's ops on ``device``) would launch, in ``threads``
    threads at once, before any of them runs. Triton's compiler spends most of its time outside the GIL (MLIR
    passes, ptxas), so a tuner that times several tile configs of every layer waits for a fraction of the serial
    compile time. The launches are recorded, not run; each distinct kernel is compiled by Triton's ``warmup``
    into Triton's caches, where the real launches find it. A kernel that fails to compile is left to its real
    launch, which reports the error. Returns how many distinct kernels compiled; 0 where the kernels do not run
    compiled (CPU, the interpreter). ``warm(kernel, args, kwargs)`` replaces the compile (tests)."""
    if _launch is None or (warm is None and not compiled(device)):
        return 0
    todo = _launch.distinct_launches(_launch.record_launches(runs))
    if not todo:
        return 0

    def one(item) -> int:
        k, args, kwargs = item
        try:
            if warm is not None:
                warm(k, args, kwargs)
            else:
                torch.cuda.set_device(device)  # Triton compiles for the calling thread's current device
                k.warmup(*args, grid=(1,), **kwargs)
            return 1
        except Exception:
            return 0
    if warm is None:
        # Each kernel's per-device caches are made here, once, rather than by two threads at once (the loser's
        # compiled kernel would land in a cache that is then dropped).
        index = device.index if device.index is not None else torch.cuda.current_device()
        for k in {id(k): k for k, _, _ in todo}.values():
            caches = getattr(k, "device_caches", None)
            if caches is not None:
                caches[index]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, threads or compile_threads()), thread_name_prefix="dla_fast_compile") as ex:
        return sum(ex.map(one, todo))


def _tf32() -> bool:
    # Read at call time, the same switch that decides whether cuDNN's fp32 convolutions use TF32.
    return bool(torch.backends.cudnn.allow_tf32)


def _direct(x: torch.Tensor) -> bool:
    """Whether to launch the kernels straight from Python rather than through the registered op
    (:func:`dla_fast.backends.direct_call`): eagerly, ``torch.ops.dla_fast_triton.*`` only adds the dispatcher's
    and wrap_triton's per-call cost, which at batch 1 (and for the small late layers at any batch) exceeds the
    kernel's own time."""
    return _backends.direct_call(x)


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                padding: Tuple[int, int], groups: int, residual: Optional[torch.Tensor], relu: bool,
                config: Tuple[int, ...] = ()) -> torch.Tensor:
    if _direct(x):
        cfg = _launch.conv_config_dict(config) if config else None
        return _launch.conv_launch(x, weight, bias, stride, padding, int(groups), residual, bool(relu), _tf32(),
                                   config=cfg, raw=True)
    return torch.ops.dla_fast_triton.conv_bn_act(x, weight, bias, [int(s) for s in stride],
                                                 [int(p) for p in padding], int(groups), residual, bool(relu),
                                                 [int(_tf32())] + [int(v) for v in config])


def aggregate(children: Sequence[torch.Tensor], weight2d: torch.Tensor, bias: Optional[torch.Tensor],
              residual: Optional[torch.Tensor], relu: bool, config: Tuple[int, ...] = ()) -> torch.Tensor:
    kids: List[torch.Tensor] = list(children)
    if _direct(kids[0]):
        cfg = _launch.aggregate_config_dict(config) if config else None
        return _launch.aggregate_launch(kids, weight2d, bias, residual, bool(relu), _tf32(), config=cfg, raw=True)
    return torch.ops.dla_fast_triton.aggregate(kids, weight2d, bias, residual, bool(relu),
                                               [int(_tf32())] + [int(v) for v in config])


def max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.max_pool2d(x, k, stride=k)`` (no padding, floor mode; the DLA trees' downsampling), channels_last
    output."""
    if _direct(x):
        return _launch.max_pool_launch(x, int(k), raw=True)
    return torch.ops.dla_fast_triton.max_pool(x, int(k))


def front(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
          w2: torch.Tensor, b2: torch.Tensor, config: Tuple[int, ...] = ()) -> torch.Tensor:
    """relu(conv3x3 s2(relu(conv3x3(relu(conv7x7(x, w0) + b0), w1) + b1), w2) + b2) in one kernel that writes only
    the last map (channels_last, x's dtype); see :func:`dla_fast.ops.front`. Biases float32, weights in x's
    dtype; ``config`` a tile tuple of ``_front`` (``()``: its heuristic)."""
    if _direct(x):
        cfg = _front.config_dict(config) if config else None
        return _front.front_launch(x, w0, b0, w1, b1, w2, b2, _tf32(), config=cfg, raw=True)
    return torch.ops.dla_fast_triton.front(x, w0, b0, w1, b1, w2, b2, [int(_tf32())] + [int(v) for v in config])


def front_shape_reason(cin: int, c0: int, c1: int) -> Optional[str]:
    """None when :func:`front` takes a front of ``cin`` input, ``c0`` stem and ``c1`` level-1 channels; else
    what does not fit."""
    if _front is None:
        return f"the Triton front kernel could not be loaded ({_FRONT_ERROR})"
    return _front.shape_reason(cin, c0, c1)


def conv_candidates(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                    padding: Tuple[int, int], groups: int,
                    residual: Optional[torch.Tensor]) -> List[Tuple[int, ...]]:
    """The tile configs worth timing for this conv, the heuristic's first."""
    return _launch.conv_candidates(x, weight, stride, padding, int(groups), _tf32())


def aggregate_candidates(children: Sequence[torch.Tensor], weight2d: torch.Tensor, bias: Optional[torch.Tensor],
                         residual: Optional[torch.Tensor]) -> List[Tuple[int, ...]]:
    """The tile configs worth timing for this aggregation node, the heuristic's first."""
    return _launch.aggregate_candidates(list(children), weight2d, _tf32())


def describe(config: Tuple[int, ...], op: str = "conv_bn_act") -> str:
    return _launch.describe(op, config)


__all__ = ["NAME", "unavailable_reason", "conv_bn_act", "aggregate", "max_pool", "conv_candidates",
           "aggregate_candidates", "describe", "front", "front_shape_reason", "compiled", "compile_ahead"]
