"""The CUDA C++ backend of the fused ops: thin wrappers over ``torch.ops.dla_fast.*`` from ``dla_fast._C``.

The extension is optional. If it is missing or fails to load (not built, built against another torch),
importing this module still works: :func:`unavailable_reason` then says why and how to build it, and the
first such query emits one warning, so that ``backend="auto"`` visibly falls back to Triton/eager.

Arguments arrive validated by :mod:`dla_fast.ops` (see ``_backends.py`` for the contract). The C++ side
re-checks what it relies on, since ``torch.ops.dla_fast.*`` can also be called directly.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import torch

NAME = "cuda"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

BUILD_HINT = ("reinstall with `pip install --no-build-isolation -e .` on a machine with nvcc and a CUDA build "
              "of torch (set DLA_FAST_FORCE_CUDA=1 to make a failed extension build an error)")

_C = None
_load_error: Optional[str] = None
try:
    from .. import _C  # noqa: F811  (registers torch.ops.dla_fast.* on import)
except Exception as e:  # ImportError when not built; anything (e.g. undefined symbol) when broken
    _C = None
    _load_error = f"{type(e).__name__}: {e}"

_warned = False


def _ext_problem() -> Optional[str]:
    if _C is not None:
        return None
    return f"the CUDA extension dla_fast._C is not available ({_load_error}); {BUILD_HINT}"


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"dla_fast: the CUDA backend is unavailable: {msg}. Falling back to the Triton/eager "
                      "backends.", RuntimeWarning, stacklevel=3)


def unavailable_reason(x: torch.Tensor) -> Optional[str]:
    """None when the CUDA kernels can run on ``x``; otherwise what is wrong and what to do."""
    why = _ext_problem()
    if why is not None:
        _warn_once(why)
        return why
    if x.device.type != "cuda":
        return (f"x is on {x.device.type}; the CUDA backend needs CUDA tensors (move the inputs with .cuda(), "
                "or use backend='auto'/'eager')")
    if x.dtype not in SUPPORTED_DTYPES:
        return (f"x has dtype {x.dtype}; the CUDA backend supports float16, bfloat16 and float32 "
                "(use backend='eager' for others)")
    return None


def last_kernel() -> str:
    """Which kernel family the last op on this thread launched ('' before any), e.g. 'tc f16 vw8 bn64'."""
    return _C.last_kernel() if _C is not None else ""


def has_wgmma(device: Optional[torch.device] = None) -> bool:
    """Whether the op runs the Hopper wgmma kernels on ``device`` (fp16/bf16, channel runs of 8): the build has
    sm_90a code (the default arch list) and the GPU is compute capability 9.x."""
    if _C is None or not _C.wgmma_built() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                padding: Tuple[int, int], groups: int, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    return torch.ops.dla_fast.conv_bn_act(x, weight, bias, [int(stride[0]), int(stride[1])],
                                          [int(padding[0]), int(padding[1])], int(groups), residual, bool(relu))


def aggregate(children: Sequence[torch.Tensor], weight2d: torch.Tensor, bias: Optional[torch.Tensor],
              residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    return torch.ops.dla_fast.aggregate(list(children), weight2d, bias, residual, bool(relu))


# --- fake (meta) kernels: shapes and channels_last strides, so the ops trace under torch.compile ----------

def _cl_empty(like: torch.Tensor, shape) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _register_fakes() -> None:
    def conv_bn_act_fake(x, weight, bias, stride: List[int], padding: List[int], groups: int, residual,
                         relu: bool):
        torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "x and weight must be 4-D")
        n, _, h, w = x.shape
        cout, _, kh, kw = weight.shape
        ho = (h + 2 * padding[0] - kh) // stride[0] + 1
        wo = (w + 2 * padding[1] - kw) // stride[1] + 1
        return _cl_empty(x, (n, cout, ho, wo))

    def aggregate_fake(children, weight, bias, residual, relu: bool):
        torch._check(len(children) >= 1, lambda: "children must be non-empty")
        ref = children[0]
        n, _, h, w = ref.shape
        return _cl_empty(ref, (n, weight.shape[0], h, w))

    for name, fn in (("dla_fast::conv_bn_act", conv_bn_act_fake), ("dla_fast::aggregate", aggregate_fake)):
        try:
            torch.library.register_fake(name)(fn)
        except RuntimeError as e:  # a second import of this module (importlib.reload in tests)
            if "already" not in str(e):
                raise


if _C is not None:
    _register_fakes()
