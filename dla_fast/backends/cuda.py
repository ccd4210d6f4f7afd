"""The CUDA C++ backend of the fused ops: thin wrappers over ``torch.ops.dla_fast.*`` from ``dla_fast._C``.

The extension is optional. If it is missing or fails to load (not built, built against another torch),
importing this module still works: :func:`unavailable_reason` then says why and how to build it, and the
first such query emits one warning, so that ``backend="auto"`` visibly falls back to Triton/eager.

Arguments arrive validated by :mod:`dla_fast.ops`. The C++ side keeps only the checks that protect memory,
since ``torch.ops.dla_fast.*`` can also be called directly.

``config`` (conv_bn_act, aggregate) picks the kernel and tile of one call: ``()`` for the extension's own rule,
or ``(family, bn, a_load)`` as listed by :func:`conv_candidates` / :func:`aggregate_candidates` (the encoding is
documented in ``csrc/ops/plan.h``; :func:`describe` names a config). A config that cannot run a call falls back to
what the rule would run, element by element; :func:`last_kernel` names what ran.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from .. import backends as _backends

NAME = "cuda"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

BUILD_HINT = ("reinstall with `pip install --no-build-isolation -e .` on a machine with nvcc and a CUDA build "
              "of torch (set DLA_FAST_FORCE_CUDA=1 to make a failed extension build an error)")

# The config encoding of csrc/ops/plan.h (a CPU test checks that the two agree).
FAMILIES = {1: "wgmma", 2: "tc", 3: "simt", 4: "direct", 5: "grouped", 6: "stem", 7: "blockdiag-wgmma",
            8: "blockdiag-tc"}
AGGREGATE_FAMILIES = (1, 2, 3)
WIDTHS = (16, 32, 64, 128, 256)
A_LOADS = {1: "gather", 2: "tma"}
# Kernels with one output-channel width: describe() leaves it out.
FIXED_WIDTH = {3: 64, 4: 32, 5: 64, 6: 16, 7: 32, 8: 32}

Config = Tuple[int, int, int]

_C = None
_load_error: Optional[str] = None
try:
    from .. import _C  # noqa: F811  (registers torch.ops.dla_fast.* on import)
except Exception as e:  # ImportError when not built; anything (e.g. undefined symbol) when broken
    _C = None
    _load_error = f"{type(e).__name__}: {e}"

_warned = False
# An extension built before it had the direct entry points still serves through torch.ops.
_HAS_DIRECT = _C is not None and hasattr(_C, "conv_bn_act")


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
    """Which kernel the last op on this thread launched ('' before any), e.g. 'tc f16 vw8 bn64'."""
    return _C.last_kernel() if _C is not None else ""


def has_wgmma(device: Optional[torch.device] = None) -> bool:
    """Whether the op runs the Hopper wgmma kernels on ``device`` (fp16/bf16, channel runs of 8): the build has
    sm_90a code (the default arch list) and the GPU is compute capability 9.x."""
    if _C is None or not _C.wgmma_built() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def describe(config: Sequence[int], op: str = "conv_bn_act") -> str:
    """A config in words: ``()`` -> "rule", ``(1, 128, 2)`` -> "wgmma bn128 tma", ``(6, 16, 1)`` -> "stem".
    Elements left to the rule (0) are omitted; so are the widths of the one-width kernels. Both ops encode the
    same way, so ``op`` changes nothing here."""
    cfg = tuple(int(v) for v in config)
    if not cfg:
        return "rule"
    if len(cfg) != 3:
        raise ValueError(f"a config is () or (family, bn, a_load), got {cfg}")
    fam, bn, a_load = cfg
    words = [FAMILIES.get(fam, "rule" if fam == 0 else f"family{fam}")]
    if bn and FIXED_WIDTH.get(fam) != bn:
        words.append(f"bn{bn}")
    if a_load == 2 or (a_load == 1 and fam in (0, 1)):
        words.append(A_LOADS[a_load])
    return " ".join(words)


def _int_list(v: Sequence[int]) -> List[int]:
    return [int(i) for i in v]


def _direct(x: torch.Tensor) -> bool:
    """Whether to call the extension's own Python functions rather than ``torch.ops.dla_fast.*``: CUDA tensors of
    a call no tracer watches (:func:`dla_fast.backends.direct_call`). Meta and CPU tensors keep the ops too, for
    their fakes and their errors."""
    return x.is_cuda and _HAS_DIRECT and _backends.direct_call(x)


# The rule's config spelled out: (0, 0, 0) runs what () runs (plan.h: 0 in an element is the rule's). The ops get
# this form because torch.export serialises an empty SymInt[] as None, which AOTInductor's proxy executor then
# cannot hand to the extension's int[] argument.
_RULE = (0, 0, 0)


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                padding: Tuple[int, int], groups: int, residual: Optional[torch.Tensor], relu: bool,
                config: Sequence[int] = ()) -> torch.Tensor:
    # The arguments arrive as Python ints and tuples of them (validated by dla_fast.ops, or a fused layer's
    # own), which the op takes as they are: no per-call conversion on this launch-bound path.
    if _direct(x):
        return _C.conv_bn_act(x, weight, bias, stride, padding, groups, residual, relu, config or _RULE)
    return torch.ops.dla_fast.conv_bn_act(x, weight, bias, stride, padding, groups, residual, relu, config or _RULE)


def aggregate(children: Sequence[torch.Tensor], weight2d: torch.Tensor, bias: Optional[torch.Tensor],
              residual: Optional[torch.Tensor], relu: bool, config: Sequence[int] = ()) -> torch.Tensor:
    if _direct(children[0]):
        return _C.aggregate(children, weight2d, bias, residual, relu, config or _RULE)
    return torch.ops.dla_fast.aggregate(children, weight2d, bias, residual, relu, config or _RULE)


def max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.max_pool2d(x, k, stride=k)`` (no padding, floor mode, NaN-propagating) into a channels_last output."""
    if _direct(x):
        return _C.max_pool(x, int(k))
    return torch.ops.dla_fast.max_pool(x, int(k))


def _triples(flat: Sequence[int]) -> List[Config]:
    return [(int(flat[i]), int(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]


def conv_candidates(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                    padding: Tuple[int, int], groups: int, residual: Optional[torch.Tensor]) -> List[Config]:
    """The configs that run this conv_bn_act call on this device exactly as named, the rule's pick first (fully
    specified), then the few others that can win. Timing them and keeping the fastest is the per-layer plan."""
    return _triples(torch.ops.dla_fast.conv_candidates(x, weight, bias, _int_list(stride), _int_list(padding),
                                                       int(groups), residual))


def aggregate_candidates(children: Sequence[torch.Tensor], weight2d: torch.Tensor, bias: Optional[torch.Tensor],
                         residual: Optional[torch.Tensor]) -> List[Config]:
    """As :func:`conv_candidates`, for an aggregation node."""
    return _triples(torch.ops.dla_fast.aggregate_candidates(list(children), weight2d, bias, residual))


# --- fake (meta) kernels: shapes and channels_last strides, so the ops trace under torch.compile / export ----
# The C++ ops check the arguments; the fakes only compute the output each would allocate.

def conv_out_shape(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]):
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    return (n, cout, (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1)


def aggregate_out_shape(children: Sequence[torch.Tensor], weight: torch.Tensor):
    n, _, h, w = children[0].shape
    return (n, weight.shape[0], h, w)


def max_pool_out_shape(x: torch.Tensor, k: int):
    n, c, h, w = x.shape
    return (n, c, h // k, w // k)


def _cl_empty(like: torch.Tensor, shape) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _register_fakes() -> None:
    def conv_bn_act_fake(x, weight, bias, stride: List[int], padding: List[int], groups: int, residual,
                         relu: bool, config: List[int]):
        return _cl_empty(x, conv_out_shape(x, weight, stride, padding))

    def aggregate_fake(children, weight, bias, residual, relu: bool, config: List[int]):
        return _cl_empty(children[0], aggregate_out_shape(children, weight))

    def max_pool_fake(x, k: int):
        return _cl_empty(x, max_pool_out_shape(x, k))

    for name, fn in (("dla_fast::conv_bn_act", conv_bn_act_fake), ("dla_fast::aggregate", aggregate_fake),
                     ("dla_fast::max_pool", max_pool_fake)):
        try:
            torch.library.register_fake(name)(fn)
        except RuntimeError as e:  # a second import of this module (importlib.reload in tests)
            if "already" not in str(e):
                raise


if _C is not None:
    _register_fakes()
