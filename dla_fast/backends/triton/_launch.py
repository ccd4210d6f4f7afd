"""Launchers, tile heuristics and the torch.library registration of the Triton kernels.

The ops are ``torch.library.triton_op``s in the ``dla_fast_triton`` namespace, so ``torch.compile`` traces
into them (the kernels become user-defined Triton kernels in the graph) and CUDA graphs capture them. Tile
sizes come from a fixed heuristic rather than autotuning: autotuning would benchmark on first use, which
breaks CUDA-graph capture and makes the first call of every new shape slow; the heuristic never looks at
the batch size. ``conv_launch``/``aggregate_launch`` accept an explicit ``config`` so benchmarks can sweep
tiles without touching the heuristic.
"""
from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.library import triton_op, wrap_triton

from ... import _env
from ..schema import NAMESPACES, OPS

from ._kernels import (_aggregate_kernel, _conv_direct_kernel, _conv_gemm_kernel, _max_pool_kernel,
                       _splitk_epilogue_kernel)

MAX_CHILDREN = 8
_I32_LIMIT = 2**31 - 1
# Element offsets switch to 64-bit when a tensor spans this many elements (tests lower it to cover IDX64).
_IDX64_THRESHOLD = _I32_LIMIT
_TC_DTYPES = (torch.float16, torch.bfloat16)


def interpreted() -> bool:
    """Whether the kernels were built for the Triton interpreter (decided when triton.jit ran)."""
    return type(_conv_gemm_kernel).__name__ == "InterpretedFunction"


# While this holds a list (in this thread or task only), launches append (kernel, args, kwargs) to it instead of
# running: record_launches, which lets the tuner compile every candidate's kernels at once before timing them.
_RECORDING: ContextVar[Optional[list]] = ContextVar("dla_fast_triton_recording", default=None)


class _Recorder:
    __slots__ = ("k", "into")

    def __init__(self, k, into: list):
        self.k, self.into = k, into

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.into.append((self.k, args, kwargs))
        return launch


def _kernel(k, raw: bool = False):
    # wrap_triton makes a launch traceable by torch.compile; interpreted kernels, and eager calls that skip
    # the registered op (raw), are launched as they are.
    into = _RECORDING.get()
    if into is not None:
        return _Recorder(k, into)
    return k if (raw or interpreted()) else wrap_triton(k)


def record_launches(runs: Sequence[Callable[[], object]]) -> List[Tuple[object, tuple, dict]]:
    """The (kernel, args, kwargs) of every Triton launch that ``runs`` (calls of the eager launchers) make, none
    of them run: the outputs they allocate stay unwritten. A run that raises (a config that does not fit its
    call) adds what it launched before; its real launch reports the error."""
    into: list = []
    token = _RECORDING.set(into)
    try:
        for run in runs:
            try:
                run()
            except Exception:
                pass
    finally:
        _RECORDING.reset(token)
    return into


def _arg_spec(v, exact: bool):
    """What Triton specialises a kernel argument on: a tensor's dtype and 16-byte alignment, an integer's being
    1 or a multiple of 16 and its width; a constexpr (``exact``) by its value."""
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, v.data_ptr() % 16 == 0)
    if exact:
        return v if isinstance(v, (int, float, bool, str, type(None), torch.dtype)) else repr(v)
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, int):
        return ("int", v == 1, v % 16 == 0, -2**31 <= v < 2**31)
    return (type(v).__name__,)


def distinct_launches(launches: Sequence[Tuple[object, tuple, dict]]) -> List[Tuple[object, tuple, dict]]:
    """``launches`` less those that compile to a kernel already in the list (same kernel, constexprs, options
    and argument specialisation), in order."""
    seen, out = set(), []
    for k, args, kwargs in launches:
        params = getattr(k, "params", None) or ()
        spec = tuple(_arg_spec(v, i < len(params) and bool(getattr(params[i], "is_constexpr", False)))
                     for i, v in enumerate(args))
        key = (id(k), spec, tuple(sorted((n, _arg_spec(v, True)) for n, v in kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append((k, args, kwargs))
    return out


def _skip_launch(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake/meta tensor seen by the interpreter-mode ops, whose fake implementation is
    the launcher itself: only the output's shape and layout are wanted then. (Compiled kernels go through
    wrap_triton, which makes the launch a no-op under fake tensors by itself.)"""
    if not interpreted():
        return False
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t) or t.device.type == "meta"


def _cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: in recent Triton that is a constexpr function whose Python call unwraps its
    # arguments (~12 us each); a launch plans with a dozen of them.
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _max_offset(t: torch.Tensor) -> int:
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its channels are unit-stride (NHWC addressing works on it as a view), else a channels_last
    copy. Channel slices of channels_last tensors (res2net splits) pass through without a copy."""
    if t.shape[1] == 1 or t.stride(1) == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _row_stride(t: torch.Tensor) -> Optional[int]:
    """Stride of one pixel if the tensor's (n, h, w) collapse to a single row index with channels at unit
    stride (a channels_last tensor or a channel slice of one), else None."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if c > 1 and sc != 1:
        return None
    if w == 1:  # sw is arbitrary when w == 1: take the stride that the next dim implies
        if h > 1:
            sw = sh
        elif n > 1:
            sw = sn
        else:
            sw = c
    if (h > 1 and sh != w * sw) or (n > 1 and sn != h * w * sw):
        return None
    return sw


def _residual_strides(residual: Optional[torch.Tensor]):
    if residual is None:
        return 0, 0, 0, 0
    sn, sc, sh, sw = residual.stride()
    return sn, sc, sh, sw


def _new_output(n: int, c: int, h: int, w: int, device, dtype) -> torch.Tensor:
    """The (channels_last) output. With DLA_FAST_TRITON_POISON=1 it starts as NaN instead of whatever the
    allocator hands back, so tests can prove that the kernels write every element."""
    y = torch.empty((n, c, h, w), device=device, dtype=dtype, memory_format=torch.channels_last)
    if _env.flag("DLA_FAST_TRITON_POISON"):
        y.fill_(float("nan"))
    return y


def _prec(dtype: torch.dtype, tf32: bool) -> str:
    return "tf32" if (dtype in _TC_DTYPES or tf32) else "ieee"


def _round_tf32(dtype: torch.dtype, tf32: bool, interp: bool) -> bool:
    # fp32 operands are rounded to TF32 before the tensor cores see them (see tf32_round). The interpreter
    # multiplies in full fp32 whatever the precision says, so rounding there would only add error.
    return dtype == torch.float32 and tf32 and not interp


# ----------------------------------------------------------------------------------------------- configs

_SM_COUNT: Dict[int, int] = {}
# Split-K limits: at most this many K slices, each at least this many K iterations (so the software pipeline
# still has something to overlap), and only when the plain grid fills less than half of the SMs.
_MAX_SPLIT = 16
_MIN_ITERS_PER_SPLIT = 4


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def _narrow_for_few_tiles(M: int, cout: int, bm: int, bn: int, n_tiles: int, num_warps: int,
                          sms: int) -> Tuple[int, int, int]:
    """(BLOCK_N, column tiles, num_warps): 64-wide column tiles instead of wider ones when the grid would fill
    at most half of the SMs anyway: narrower tiles double the programs before any K splitting is needed."""
    if bn > 64 and 2 * _cdiv(M, bm) * n_tiles <= sms:
        bn = 64
        n_tiles = _cdiv(cout, bn)
        num_warps = 8 if bm * bn >= 128 * 128 else 4
    return bn, n_tiles, num_warps


def _splitk_reduce() -> int:
    """The heuristic's way of summing split-K partials (``REDUCE`` of a config): 0, a second kernel (the
    epilogue kernel); 1, the last program of each tile inside the GEMM kernel (``DLA_FAST_TRITON_SPLITK``)."""
    return 1 if _env.choice("DLA_FAST_TRITON_SPLITK") == "kernel" else 0


def _split_k(tiles: int, k_iters: int, sms: int) -> int:
    """How many K slices a grid of ``tiles`` output tiles with ``k_iters`` K iterations each should use on a
    GPU of ``sms`` SMs (0: never split). At batch 1 the deep DLA levels give 4-30 tiles of 36-72 iterations:
    a handful of SMs each stream a whole weight slice while the rest idle."""
    if sms <= 0 or 2 * tiles > sms:
        return 1
    return max(1, min(_MAX_SPLIT, _cdiv(sms, tiles), k_iters // _MIN_ITERS_PER_SPLIT))

def conv_plan(M: int, Cin_g: int, Cout_g: int, groups: int, kh: int, kw: int, dtype: torch.dtype,
              tf32: bool, interp: bool, force: Optional[str] = None, sms: int = 0) -> Dict:
    """Kernel choice and tile sizes for a convolution. ``force`` ("dense", "flat", "blockdiag", "direct")
    overrides the kernel choice (used by tests and benchmarks). ``sms``: the GPU's SM count, for split-K on
    grids too small to fill it (0: no split-K)."""
    tensor_cores = dtype in _TC_DTYPES or tf32
    small_group = groups > 1 and (Cin_g < 16 or Cout_g < 16)
    if force is None:
        force = _env.get("DLA_FAST_TRITON_CONV")
    if force is not None:
        kind = force
    elif small_group:
        maxc = max(Cin_g, Cout_g)
        # Block-diagonal tensor cores waste a factor GB of MMA work; IEEE fp32 has no tensor cores to
        # waste, so it takes the direct kernel; very wide groups would need too large a K tile.
        kind = "blockdiag" if (tensor_cores and maxc <= 64) else "direct"
    elif Cin_g < 16:
        kind = "flat"
    else:
        kind = "dense"
    if kind == "blockdiag" and max(Cin_g, Cout_g) > 128:
        kind = "direct"

    esize = 2 if dtype in _TC_DTYPES else 4
    if kind == "direct":
        cog = min(_pow2(Cout_g), 16)
        gb = max(1, min(64 // cog, _pow2(groups)))
        bm = 16 if interp else max(16, 4096 // (gb * cog))
        return dict(kind=kind, BLOCK_M=bm, GB=gb, COG=cog, num_warps=4, num_stages=1)

    if kind == "blockdiag":
        maxc = max(Cin_g, Cout_g)
        width = 32 if maxc >= 4 else 16
        gb = max(1, min(width // maxc, groups))
        bk = max(16, _pow2(gb * Cin_g))
        bn = max(16, _pow2(gb * Cout_g))
        bm = 32 if interp else 128
        return dict(kind=kind, MODE=2, GB=gb, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
                    num_stages=3)

    if kind == "flat":
        bk = 16 if interp else 32
    else:
        if esize == 2:
            bk = 64 if Cin_g >= 64 else (32 if Cin_g > 16 else 16)
        else:
            bk = 32 if Cin_g >= 32 else 16
    if Cout_g >= 128:
        bn = 128
    elif Cout_g > 32:
        bn = 64
    elif Cout_g > 16:
        bn = 32
    else:
        bn = 16
    if interp:
        return dict(kind=kind, MODE=1 if kind == "flat" else 0, GB=1, BLOCK_M=32, BLOCK_N=min(bn, 32),
                    BLOCK_K=16, num_warps=4, num_stages=1)
    n_tiles = groups * _cdiv(Cout_g, bn)
    bm = 128 if _cdiv(M, 128) * n_tiles >= 264 else 64
    num_warps = 8 if bm * bn >= 128 * 128 else 4
    stages = 4 if bk * esize <= 64 else 3
    if not tensor_cores:
        # IEEE fp32: tl.dot runs on FMA units and keeps more per-thread state; larger tiles spilled (sm_90).
        bn = min(bn, 64)
        bk = min(bk, 32)
        num_warps = 8 if bm >= 128 else 4
        stages = 2
    elif kind == "flat" or (Cin_g * esize) % 16:
        # Rows that are not 16-byte aligned load element by element (no cp.async), each lane holding many
        # addresses: 4 warps on 128 rows spilled (28 channels, sm_90); 8 warps and a shallow pipeline
        # don't.
        stages = 2
        num_warps = 8 if bm >= 128 else 4
    split = 1
    if kind == "dense" and groups == 1:
        bn, n_tiles, num_warps = _narrow_for_few_tiles(M, Cout_g, bm, bn, n_tiles, num_warps, sms)
        split = _split_k(_cdiv(M, bm) * n_tiles, kh * kw * _cdiv(Cin_g, bk), sms)
    return dict(kind=kind, MODE=1 if kind == "flat" else 0, GB=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=num_warps, num_stages=stages, SPLIT=split, REDUCE=_splitk_reduce() if split > 1 else 0)


def aggregate_plan(M: int, chans: Sequence[int], Cout: int, dtype: torch.dtype, interp: bool,
                   tf32: bool = True, sms: int = 0) -> Dict:
    esize = 2 if dtype in _TC_DTYPES else 4
    if interp:
        return dict(BLOCK_M=32, BLOCK_N=32 if Cout > 16 else 16, BLOCK_K=16, num_warps=4, num_stages=1)
    cmin = min(chans)
    if esize == 2:
        bk = 64 if cmin >= 64 else (32 if cmin > 16 else 16)
    else:
        bk = 32 if cmin >= 32 else 16
    bn = 128 if Cout >= 128 else (64 if Cout > 32 else (32 if Cout > 16 else 16))
    n_tiles = _cdiv(Cout, bn)
    bm = 128 if _cdiv(M, 128) * n_tiles >= 264 else 64
    num_warps = 8 if bm * bn >= 128 * 128 else 4
    stages = 3 if all((c * esize) % 16 == 0 for c in chans) else 2
    if not tf32 and dtype not in _TC_DTYPES:  # IEEE fp32: see conv_plan
        bn, bk, stages = min(bn, 64), min(bk, 32), 2
        num_warps = 8 if bm >= 128 else 4
    bn, n_tiles, num_warps = _narrow_for_few_tiles(M, Cout, bm, bn, n_tiles, num_warps, sms)
    split = _split_k(_cdiv(M, bm) * n_tiles, sum(_cdiv(c, bk) for c in chans), sms)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps, num_stages=stages, SPLIT=split,
                REDUCE=_splitk_reduce() if split > 1 else 0)


# --------------------------------------------------------------------------------------------- launchers

def _n_tiling(cfg: Dict[str, int], Cin_g: int, Cout_g: int, groups: int) -> Tuple[int, int, bool]:
    """How a conv config's N tiles cover the output channels: (tiles per group, N tiles in all, whether the
    block-diagonal tiles hold exactly GB whole groups with no tails)."""
    bn, bk, gb = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["GB"]
    if cfg["MODE"] == 2:
        if gb * Cin_g > bk or gb * Cout_g > bn:
            raise ValueError(f"block-diagonal config {cfg} does not cover {gb} groups of {Cin_g}->{Cout_g}")
        return 1, _cdiv(groups, gb), groups % gb == 0 and gb * Cin_g == bk and gb * Cout_g == bn
    tiles_per_group = _cdiv(Cout_g, bn)
    return tiles_per_group, groups * tiles_per_group, False


def conv_launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                padding: Sequence[int], groups: int, residual: Optional[torch.Tensor], relu: bool, tf32: bool,
                config: Optional[Dict] = None, force: Optional[str] = None, raw: bool = False) -> torch.Tensor:
    x = _nhwc(x)
    N, Cin, H, W = x.shape
    Cout, Cin_g, kh, kw = weight.shape
    # [Cout, kh, kw, Cin_g] contiguous: a free view of a channels_last weight.
    w = weight.permute(0, 2, 3, 1).contiguous()
    sh_, sw_ = int(stride[0]), int(stride[1])
    ph, pw = int(padding[0]), int(padding[1])
    Ho = (H + 2 * ph - kh) // sh_ + 1
    Wo = (W + 2 * pw - kw) // sw_ + 1
    Cout_g = Cout // groups
    M = N * Ho * Wo
    y = _new_output(N, Cout, Ho, Wo, x.device, x.dtype)
    if M == 0 or Cout == 0 or _skip_launch(y):
        return y
    if Cin_g == 0:  # an empty reduction: the output is the epilogue of zero
        acc = torch.zeros((N, Cout, Ho, Wo), device=x.device, dtype=torch.float32)
        if bias is not None:
            acc = acc + bias.view(1, -1, 1, 1)
        if residual is not None:
            acc = acc + residual.float()
        if relu:
            acc = torch.relu(acc)
        y.copy_(acc)
        return y
    interp = interpreted()
    sms = 0 if interp else _sm_count(x.device)
    cfg = dict(config) if config is not None else conv_plan(M, Cin_g, Cout_g, groups, kh, kw, x.dtype, tf32,
                                                              interp, force, sms)
    idx64 = max(_max_offset(x), y.numel(), 0 if residual is None else _max_offset(residual)) >= _IDX64_THRESHOLD
    if M >= _I32_LIMIT:
        raise RuntimeError(f"conv_bn_act (triton): {M} output pixels exceed the kernel's 32-bit row index")
    sxn, _, sxh, sxw = x.stride()
    srn, src, srh, srw = _residual_strides(residual)
    b_arg = bias if bias is not None else w
    r_arg = residual if residual is not None else x
    pad = ph > 0 or pw > 0
    common = dict(HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu), IDX64=idx64,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    if cfg["kind"] == "direct":
        gb, cog, bm = cfg["GB"], cfg["COG"], cfg["BLOCK_M"]
        co_tiles = _cdiv(Cout_g, cog)
        n_tiles = _cdiv(groups, gb) * co_tiles
        grid_n = _cdiv(M, bm) * n_tiles
        _kernel(_conv_direct_kernel, raw)[lambda meta: (grid_n,)](
            x, w, b_arg, r_arg, y,
            M, H, W, Ho, Wo, Cin_g, Cout_g, Cout, groups,
            sxn, sxh, sxw, srn, src, srh, srw,
            sh_, sw_, ph, pw, n_tiles, co_tiles,
            KH=kh, KW=kw, PAD=pad, BLOCK_M=bm, GB=gb, COG=cog, **common)
        return y

    bm, bn, bk, mode, gb = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["MODE"], cfg["GB"]
    tiles_per_group, n_tiles, full = _n_tiling(cfg, Cin_g, Cout_g, groups)
    grid_n = _cdiv(M, bm) * n_tiles
    split = int(cfg.get("SPLIT", 1))
    if split > 1 and mode != 0:
        raise ValueError(f"config {cfg}: split-K is only implemented for the dense (tap-major) kernel")
    ws = _workspace(split, M, Cout, y)
    cnt = _reduce_counters(cfg, split, grid_n, y)
    _kernel(_conv_gemm_kernel, raw)[lambda meta: (grid_n, split)](
        x, w, b_arg, r_arg, y, ws, x if cnt is None else cnt,
        M, H, W, Ho, Wo, Cin, Cin_g, Cout_g, Cout,
        sxn, sxh, sxw, srn, src, srh, srw,
        sh_, sw_, ph, pw, n_tiles, tiles_per_group,
        KH=kh, KW=kw, MODE=mode, GB=gb, FULL=full, PAD=pad, PREC=_prec(x.dtype, tf32),
        RND=_round_tf32(x.dtype, tf32, interp),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, REDUCE=cnt is not None, **common)
    if split > 1 and cnt is None:
        _splitk_epilogue(ws, split, bias, residual, y, M, Ho * Wo, Wo, Cout, relu, raw)
    return y


def _workspace(split: int, M: int, Cout: int, y: torch.Tensor) -> torch.Tensor:
    """fp32 partial sums of a split-K launch (``y`` itself, unused, when there is no split)."""
    if split <= 1:
        return y
    if split * M * Cout >= _I32_LIMIT:
        raise ValueError(f"split-K workspace of {split} x {M} x {Cout} exceeds 32-bit offsets; use SPLIT=1")
    return torch.empty((split, M, Cout), device=y.device, dtype=torch.float32)


# The in-kernel split-K reduction (REDUCE) counts each tile's finished programs in int32 counters that start at
# zero and that the tile's last program sets back to zero. A launch must not share counters with one that may run
# at the same time: eager launches take one region per (device, stream), and each launch captured into a CUDA graph
# a region of its own (CUDA never runs a graph concurrently with itself). The counters are zeroed once, outside
# any capture. Where none can be had (a capture before any eager launch on the device, the pool used up, more
# tiles than a region holds, a call torch.compile traces) the partials are summed by the epilogue kernel instead,
# which gives the same bits.
_COUNTER_SLOTS = 1 << 18   # int32 counters per device (1 MB): a dla34 graph at batch 1 takes under 1000
_COUNTER_REGION = 256      # tiles a launch may have (split-K runs only on grids under half the SMs)


class _CounterPool:
    def __init__(self, device: torch.device):
        self.buf = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
        if device.type == "cuda":  # zeroed before any stream (or graph) uses a region of it
            torch.cuda.current_stream(device).synchronize()
        self.used = 0
        self.by_stream: Dict[int, torch.Tensor] = {}

    def take(self, n: int) -> Optional[torch.Tensor]:
        """``n`` counters no other region holds (rounded up to 128 bytes), or None when the pool is used up."""
        n = -(-n // 32) * 32
        if self.used + n > _COUNTER_SLOTS:
            return None
        region = self.buf[self.used:self.used + n]
        self.used += n
        return region


_COUNTER_POOLS: Dict[Tuple[str, int], _CounterPool] = {}
_COUNTER_LOCK = threading.Lock()


def _tile_counters(device: torch.device, tiles: int) -> Optional[torch.Tensor]:
    """Zeroed counters for a launch of ``tiles`` tiles on the current stream of ``device``, or None."""
    if tiles > _COUNTER_REGION:
        return None
    capturing, stream = False, 0
    if device.type == "cuda":
        capturing = torch.cuda.is_current_stream_capturing()
        stream = torch.cuda.current_stream(device).cuda_stream
        index = device.index if device.index is not None else torch.cuda.current_device()
    else:
        index = device.index or 0
    with _COUNTER_LOCK:
        pool = _COUNTER_POOLS.get((device.type, index))
        if pool is None:
            if capturing:  # a memset now would become part of the graph
                return None
            pool = _COUNTER_POOLS[(device.type, index)] = _CounterPool(torch.device(device.type, index))
        if capturing:
            return pool.take(tiles)
        region = pool.by_stream.get(stream)
        if region is None:
            region = pool.take(_COUNTER_REGION)
            if region is not None:
                pool.by_stream[stream] = region
        return region


def _reduce_counters(cfg: Dict, split: int, tiles: int, y: torch.Tensor) -> Optional[torch.Tensor]:
    """The counters of a launch whose config sums its split-K partials in the kernel (REDUCE), or None: no split,
    the epilogue kernel asked for, or no counters to be had (then the epilogue kernel runs instead)."""
    if split <= 1 or not cfg.get("REDUCE", 0):
        return None
    if type(y) is not torch.Tensor or torch.compiler.is_compiling():  # traced: the graph keeps two kernels
        return None
    return _tile_counters(y.device, tiles)


def _splitk_epilogue(ws, split, bias, residual, y, M, HW, W, Cout, relu, raw: bool = False) -> None:
    bn = min(64, max(16, _pow2(Cout)))
    n_tiles = _cdiv(Cout, bn)
    # A memory-bound pass over split x M x Cout fp32: thin tiles, so that at batch 1 (M = 49 pixels at 7x7)
    # the grid still spreads over the SMs instead of 8 programs each reading 16 partial tiles alone
    # (5.6 us per call on the H200 with 64-row tiles).
    bm = 64
    sms = 132 if interpreted() else _sm_count(y.device)
    while bm > 2 and _cdiv(M, bm) * n_tiles < 2 * sms:
        bm //= 2
    grid = _cdiv(M, bm) * n_tiles
    srn, src, srh, srw = _residual_strides(residual)
    _kernel(_splitk_epilogue_kernel, raw)[lambda meta: (grid,)](
        ws, bias if bias is not None else ws, residual if residual is not None else ws, y,
        M, HW, W, Cout, srn, src, srh, srw, n_tiles,
        SPLIT=split, HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1)


def aggregate_launch(children: Sequence[torch.Tensor], weight2d: torch.Tensor, bias: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor], relu: bool, tf32: bool, config: Optional[Dict] = None,
                     out_dtype: Optional[torch.dtype] = None, raw: bool = False) -> torch.Tensor:
    children = list(children)
    ref = children[0]
    N, _, H, W = ref.shape
    Cout, Ctot = weight2d.shape
    dtype = ref.dtype
    out_dtype = out_dtype or dtype
    if len(children) > MAX_CHILDREN:
        # Chain: the first MAX_CHILDREN children (plus the residual) go to an fp32 partial sum that the
        # next call reads back as its residual, so precision matches one long K loop and nothing is
        # concatenated.
        k = sum(c.shape[1] for c in children[:MAX_CHILDREN])
        part = aggregate_launch(children[:MAX_CHILDREN], weight2d[:, :k], None, residual, False, tf32,
                                config, out_dtype=torch.float32, raw=raw)
        return aggregate_launch(children[MAX_CHILDREN:], weight2d[:, k:], bias, part, relu, tf32, config,
                                out_dtype=out_dtype, raw=raw)
    w = weight2d.contiguous()
    kids, strides = [], []
    for c in children:
        s = _row_stride(c)
        if s is None:
            c = c.contiguous(memory_format=torch.channels_last)
            s = _row_stride(c)
        kids.append(c)
        strides.append(int(s))
    chans = [int(c.shape[1]) for c in kids]
    M = N * H * W
    y = _new_output(N, Cout, H, W, ref.device, out_dtype)
    if M == 0 or Cout == 0 or _skip_launch(y):
        return y
    if M >= _I32_LIMIT:
        raise RuntimeError(f"aggregate (triton): {M} pixels exceed the kernel's 32-bit row index")
    interp = interpreted()
    sms = 0 if interp else _sm_count(ref.device)
    cfg = dict(config) if config is not None else aggregate_plan(M, chans, Cout, dtype, interp, tf32, sms)
    idx64 = max([_max_offset(c) for c in kids] + [y.numel()]
                + [0 if residual is None else _max_offset(residual)]) >= _IDX64_THRESHOLD
    nc = len(kids)
    ptrs = kids + [kids[0]] * (MAX_CHILDREN - nc)
    cs = chans + [0] * (MAX_CHILDREN - nc)
    ss = strides + [0] * (MAX_CHILDREN - nc)
    srn, src, srh, srw = _residual_strides(residual)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    n_tiles = _cdiv(Cout, bn)
    grid_n = _cdiv(M, bm) * n_tiles
    split = int(cfg.get("SPLIT", 1))
    ws = _workspace(split, M, Cout, y)
    cnt = _reduce_counters(cfg, split, grid_n, y)
    _kernel(_aggregate_kernel, raw)[lambda meta: (grid_n, split)](
        *ptrs, *cs, *ss,
        w, bias if bias is not None else w, residual if residual is not None else kids[0], y, ws,
        w if cnt is None else cnt,
        M, H * W, W, Cout, Ctot,
        srn, src, srh, srw, n_tiles,
        NUM_CHILDREN=nc, HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=bool(relu),
        PREC=_prec(dtype, tf32), RND=_round_tf32(dtype, tf32, interp), IDX64=idx64, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, SPLIT=split, REDUCE=cnt is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1 and cnt is None:
        _splitk_epilogue(ws, split, bias, residual, y, M, H * W, W, Cout, relu, raw)
    return y


def max_pool_launch(x: torch.Tensor, k: int, raw: bool = False) -> torch.Tensor:
    """``F.max_pool2d(x, k, stride=k)`` (no padding, floor mode) into a channels_last output."""
    N, C, H, W = x.shape
    Ho, Wo = H // k, W // k
    y = _new_output(N, C, Ho, Wo, x.device, x.dtype)
    P = N * Ho * Wo
    if P == 0 or C == 0 or _skip_launch(y):
        return y
    if max(_max_offset(x), y.numel()) >= _I32_LIMIT:
        raise RuntimeError(f"max_pool (triton): a {tuple(x.shape)} input exceeds the kernel's 32-bit offsets")
    bc = min(64, max(16, _pow2(C)))
    bp = 16 if interpreted() else max(16, 4096 // bc)
    n_tiles_c = _cdiv(C, bc)
    grid = _cdiv(P, bp) * n_tiles_c
    sxn, sxc, sxh, sxw = x.stride()
    _kernel(_max_pool_kernel, raw)[lambda meta: (grid,)](
        x, y, P, H, W, Ho, Wo, C, sxn, sxc, sxh, sxw, n_tiles_c,
        K=int(k), BLOCK_P=bp, BLOCK_C=bc, num_warps=4, num_stages=1)
    return y


# ------------------------------------------------------------------------------------------ plan configs
# A per-layer plan hands this backend its tiles as a tuple of ints (the dla_fast.backends protocol); () keeps the
# heuristic above. The registered ops take [tf32] + that tuple: TF32 follows torch.backends.cudnn.allow_tf32 at
# call time, like cuDNN's fp32 convolutions, so it is not part of the plan.
CONV_KINDS = ("dense", "flat", "blockdiag", "direct")
# REDUCE (last): how split-K partials are summed, 0 by the epilogue kernel, 1 inside the GEMM kernel. Plans kept
# from before it existed have one element fewer and read as 0.
_CONV_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GB", "COG", "num_warps", "num_stages", "SPLIT", "REDUCE")
_AGG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "SPLIT", "REDUCE")


def _field(cfg: Dict, f: str) -> int:
    return int(cfg.get(f, 1 if f == "SPLIT" else 0))


def conv_config_tuple(cfg: Dict) -> Tuple[int, ...]:
    """A :func:`conv_plan` dict as the plan's int tuple."""
    return (CONV_KINDS.index(cfg["kind"]),) + tuple(_field(cfg, f) for f in _CONV_FIELDS)


def conv_config_dict(t: Sequence[int]) -> Dict:
    """The plan's int tuple as the dict :func:`conv_launch` takes."""
    t = tuple(int(v) for v in t)
    if len(t) == len(_CONV_FIELDS):
        t = t + (0,)
    if (len(t) != 1 + len(_CONV_FIELDS) or not 0 <= t[0] < len(CONV_KINDS) or min(t[1:]) < 0
            or t[-1] not in (0, 1)):
        raise ValueError(f"Triton conv config {t} is malformed: expected (kind 0-{len(CONV_KINDS) - 1}, "
                         f"{', '.join(_CONV_FIELDS)}), all non-negative, REDUCE 0 or 1")
    cfg: Dict = dict(zip(_CONV_FIELDS, t[1:]))
    cfg["kind"] = CONV_KINDS[t[0]]
    if cfg["kind"] != "direct":
        cfg["MODE"] = {"dense": 0, "flat": 1, "blockdiag": 2}[cfg["kind"]]
    cfg["SPLIT"] = max(1, cfg["SPLIT"])
    return cfg


def aggregate_config_tuple(cfg: Dict) -> Tuple[int, ...]:
    return tuple(_field(cfg, f) for f in _AGG_FIELDS)


def aggregate_config_dict(t: Sequence[int]) -> Dict:
    t = tuple(int(v) for v in t)
    if len(t) == len(_AGG_FIELDS) - 1:
        t = t + (0,)
    if len(t) != len(_AGG_FIELDS) or min(t[:-1]) < 1 or t[-1] not in (0, 1):
        raise ValueError(f"Triton aggregate config {t} is malformed: expected ({', '.join(_AGG_FIELDS)}), "
                         "all positive but REDUCE, which is 0 or 1")
    return dict(zip(_AGG_FIELDS, t))


def _alternatives(base: Dict, M: int, cout: int, sms: int) -> List[Dict]:
    """The few tilings of a dense GEMM worth timing beside the heuristic's: the other row tile, the 64-wide
    column tile for wide outputs, and where the heuristic splits K, the other reduction and no split."""
    out = [base]
    if base.get("SPLIT", 1) > 1:
        out.append(dict(base, REDUCE=1 - base.get("REDUCE", 0)))  # the other way of summing the partials
        out.append(dict(base, SPLIT=1, REDUCE=0))
    if base.get("SPLIT", 1) == 1:
        bm = 64 if base["BLOCK_M"] == 128 else 128
        out.append(dict(base, BLOCK_M=bm, num_warps=8 if bm * base["BLOCK_N"] >= 128 * 128 else 4))
    if base["BLOCK_N"] == 128 and cout > 64:
        out.append(dict(base, BLOCK_N=64, num_warps=8 if base["BLOCK_M"] * 64 >= 128 * 128 else 4))
    return out


def conv_candidates(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                    groups: int, tf32: bool) -> List[Tuple[int, ...]]:
    """The conv configs worth timing for this call, the heuristic's first."""
    N, _, H, W = x.shape
    Cout, Cin_g, kh, kw = weight.shape
    Ho = (H + 2 * int(padding[0]) - kh) // int(stride[0]) + 1
    Wo = (W + 2 * int(padding[1]) - kw) // int(stride[1]) + 1
    M = N * Ho * Wo
    interp = interpreted()
    sms = 0 if interp else _sm_count(x.device)
    Cout_g = Cout // groups
    base = conv_plan(M, Cin_g, Cout_g, groups, kh, kw, x.dtype, tf32, interp, None, sms)
    cands = [base]
    tensor_cores = x.dtype in _TC_DTYPES or tf32
    if not interp and tensor_cores:
        if base["kind"] == "dense":
            cands = _alternatives(base, M, Cout_g, sms)
        elif base["kind"] == "blockdiag":
            cands.append(conv_plan(M, Cin_g, Cout_g, groups, kh, kw, x.dtype, tf32, interp, "direct", sms))
        elif base["kind"] == "direct" and groups > 1 and max(Cin_g, Cout_g) <= 64:
            cands.append(conv_plan(M, Cin_g, Cout_g, groups, kh, kw, x.dtype, tf32, interp, "blockdiag", sms))
    seen, out = set(), []
    for c in cands:
        t = conv_config_tuple(c)
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def aggregate_candidates(children: Sequence[torch.Tensor], weight2d: torch.Tensor,
                         tf32: bool) -> List[Tuple[int, ...]]:
    """The aggregate configs worth timing for this call, the heuristic's first."""
    ref = children[0]
    M = ref.shape[0] * ref.shape[2] * ref.shape[3]
    interp = interpreted()
    sms = 0 if interp else _sm_count(ref.device)
    chans = [int(c.shape[1]) for c in children]
    base = aggregate_plan(M, chans, int(weight2d.shape[0]), ref.dtype, interp, tf32, sms)
    tensor_cores = ref.dtype in _TC_DTYPES or tf32
    cands = _alternatives(base, M, int(weight2d.shape[0]), sms) if (tensor_cores and not interp) else [base]
    return list(dict.fromkeys(aggregate_config_tuple(c) for c in cands))


def describe(op: str, config: Sequence[int]) -> str:
    """A short human-readable name of a config, e.g. "dense 128x128x64 w8 s3 split4"."""
    if not config:
        return "heuristic"
    if op == "aggregate":
        c = aggregate_config_dict(config)
        kind = "gemm"
    else:
        c = conv_config_dict(config)
        kind = c["kind"]
        if kind == "direct":
            return f"direct {c['BLOCK_M']}x{c['GB']}x{c['COG']} w{c['num_warps']}"
    split = (f" split{c['SPLIT']}" + (" in-kernel" if c.get("REDUCE", 0) else "")) if c.get("SPLIT", 1) > 1 else ""
    return f"{kind} {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}{split}"


def _unpack(config: Sequence[int]) -> Tuple[bool, Tuple[int, ...]]:
    if len(config) < 1:
        raise ValueError("the Triton ops take config = [tf32] + the plan's tile tuple (which may be empty)")
    return bool(config[0]), tuple(int(v) for v in config[1:])


# ------------------------------------------------------------------------------------------ custom ops
# The annotations give the schemas of dla_fast/backends/schema.py (a test compares them): the same arguments as
# the CUDA extension's ops.

def _conv_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
               padding: List[int], groups: int, residual: Optional[torch.Tensor], relu: bool,
               config: List[int]) -> torch.Tensor:
    tf32, tiles = _unpack(config)
    return conv_launch(x, weight, bias, stride, padding, groups, residual, relu, tf32,
                       config=conv_config_dict(tiles) if tiles else None)


def _aggregate_impl(children: List[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], relu: bool, config: List[int]) -> torch.Tensor:
    tf32, tiles = _unpack(config)
    return aggregate_launch(children, weight, bias, residual, relu, tf32,
                            config=aggregate_config_dict(tiles) if tiles else None)


def _max_pool_impl(x: torch.Tensor, k: int) -> torch.Tensor:
    return max_pool_launch(x, k)


_IMPLS = {"conv_bn_act": _conv_impl, "aggregate": _aggregate_impl, "max_pool": _max_pool_impl}


def register_ops(namespace: str, impls: Dict[str, object], schemas: Dict[str, str]) -> None:
    """Register each ``impls[name]`` as ``namespace::name`` with ``schemas[name]`` (every Triton op of the package:
    inference, front, training)."""
    for name, fn in impls.items():
        qualname, schema = f"{namespace}::{name}", schemas[name]
        if interpreted():
            # The interpreter's kernels cannot be traced into a graph (torch hands the raw kernel back from
            # wrap_triton), so under TRITON_INTERPRET the ops are opaque custom ops whose fake implementation
            # is the launcher itself (it skips the launch for fake tensors): torch.compile then calls the
            # real kernels instead of silently dropping them from the graph.
            op = torch.library.custom_op(qualname, mutates_args=(), schema=schema)(fn)
            op.register_fake(fn)
        else:
            triton_op(qualname, mutates_args=(), schema=schema)(fn)


def _register() -> None:
    register_ops(NAMESPACES["triton"], _IMPLS, OPS)

_register()
