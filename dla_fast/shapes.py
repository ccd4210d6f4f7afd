"""The real per-layer shapes of the fused ops in a DLA variant, read off the model rather than typed in.

We build the optimized model with the eager backend on the CPU, hook every fused layer
(:class:`~dla_fast.fuse.FusedConvBnAct`, :class:`~dla_fast.fuse.FusedAggregate`) and run one forward on the
meta device (shapes and strides without memory or arithmetic): whatever the fusion pass produced (strides,
paddings, groups, root child splits, residual wiring, ReLU or not, channel-slice views in the Res2Net blocks) is
what gets recorded, so the op benchmarks, the tests and the tuner cannot drift from the model. Spatial shapes
do not depend on the batch, so the forward runs at batch 1 and ``N`` is a parameter of the recorded shape; the
input size is any (H, W) the model accepts (224x224 classification, 512x512 or 608x1088 detection, ...).

    python -m dla_fast.shapes dla34 dla60 [--batch 256] [--hw 224 | 512x512 | 608 1088] [--all-layers]
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .fuse import FusedAggregate, FusedConvBnAct

HW = Union[int, Tuple[int, int], Sequence[int]]

RESIDUAL_KINDS = ("none", "tensor", "child0")


@dataclass(frozen=True)
class OpShape:
    """One fused-op call, batch size excluded.

    ``cin`` is ``(Cin,)`` for a conv and the per-child channel split for an aggregate. ``residual`` is
    "none", "tensor" (a separate tensor of the output's shape) or "child0" (an aggregation root adding its
    first child, the same tensor it reads as input). ``pitches`` is each input's channel pitch in NHWC
    memory: equal to its channel count unless the input is a channel slice of a wider tensor (Res2Net);
    ``offsets`` is then the slice's first channel, which sets the pointer alignment the kernel sees.
    """

    op: str
    cin: Tuple[int, ...]
    hw: Tuple[int, int]
    cout: int
    kernel: Tuple[int, int] = (1, 1)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    groups: int = 1
    residual: str = "none"
    relu: bool = True
    pitches: Tuple[int, ...] = ()
    offsets: Tuple[int, ...] = ()

    def __post_init__(self):
        if self.op not in ("conv_bn_act", "aggregate"):
            raise ValueError(f"unknown op {self.op!r}")
        if self.residual not in RESIDUAL_KINDS:
            raise ValueError(f"residual must be one of {RESIDUAL_KINDS}, got {self.residual!r}")
        if not self.pitches:
            object.__setattr__(self, "pitches", tuple(self.cin))
        if not self.offsets:
            object.__setattr__(self, "offsets", (0,) * len(self.cin))
        if not (len(self.cin) == len(self.pitches) == len(self.offsets)) or any(
                o + c > p for c, p, o in zip(self.cin, self.pitches, self.offsets)):
            raise ValueError(f"inconsistent cin/pitches/offsets {self.cin}/{self.pitches}/{self.offsets}")

    @property
    def cin_total(self) -> int:
        return sum(self.cin)

    @property
    def out_hw(self) -> Tuple[int, int]:
        (h, w), (kh, kw), (sh, sw), (ph, pw) = self.hw, self.kernel, self.stride, self.padding
        return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        if self.op == "aggregate":
            return (self.cout, self.cin_total)
        return (self.cout, self.cin_total // self.groups, *self.kernel)

    def input_shapes(self, n: int) -> List[Tuple[int, int, int, int]]:
        return [(n, c, *self.hw) for c in self.cin]

    def output_shape(self, n: int) -> Tuple[int, int, int, int]:
        return (n, self.cout, *self.out_hw)

    def macs_per_pixel(self) -> int:
        """Multiply-adds per output pixel: Cout * (Cin / groups) * kh * kw."""
        kh, kw = self.kernel
        return self.cout * (self.cin_total // self.groups) * kh * kw

    def flops(self, n: int) -> int:
        """2 * M * Cout * (Cin / groups) * kh * kw with M = N * Ho * Wo (the epilogue is not counted)."""
        ho, wo = self.out_hw
        return 2 * n * ho * wo * self.macs_per_pixel()

    def min_bytes(self, n: int, itemsize: int) -> int:
        """Bytes an ideal kernel moves: every input, the weight, the fp32 bias and a separate residual read
        once, the output written once. A "child0" residual is the first input, already counted."""
        h, w = self.hw
        ho, wo = self.out_hw
        inputs = n * h * w * self.cin_total * itemsize
        weight = self.macs_per_pixel() * itemsize
        bias = self.cout * 4
        out = n * ho * wo * self.cout * itemsize
        res = out if self.residual == "tensor" else 0
        return inputs + weight + bias + res + out

    def label(self) -> str:
        h, w = self.hw
        cin = "+".join(map(str, self.cin))
        res = {"none": "", "tensor": " +res", "child0": " +res(c0)"}[self.residual]
        act = "" if self.relu else " norelu"
        if self.pitches != self.cin:
            act += " pitch " + "/".join(f"{p}@{o}" if o else str(p) for p, o in zip(self.pitches, self.offsets))
        if self.op == "aggregate":
            return f"agg {cin}->{self.cout} @{h}x{w}{res}{act}"
        kh, kw = self.kernel
        g = f" g{self.groups}" if self.groups > 1 else ""
        s = f" s{self.stride[0]}" if self.stride != (1, 1) else ""
        return f"conv {cin}->{self.cout} k{kh}x{kw}{s}{g} @{h}x{w}{res}{act}"

    def ident(self) -> str:
        """A short id usable as a pytest parameter id / file name (no spaces)."""
        h, w = self.hw
        cin = "+".join(map(str, self.cin))
        tail = f"{'r' if self.residual == 'tensor' else 'c' if self.residual == 'child0' else ''}" \
               f"{'' if self.relu else 'n'}"
        tail = f"-{tail}" if tail else ""
        if self.pitches != self.cin:
            tail += "-pitch" + "_".join(f"{p}o{o}" for p, o in zip(self.pitches, self.offsets))
        if self.op == "aggregate":
            return f"agg{cin}-{self.cout}-{h}x{w}{tail}"
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        k = f"k{kh}" if kh == kw else f"k{kh}x{kw}"
        s = f"s{sh}" if sh == sw else f"s{sh}x{sw}"
        if (ph, pw) != ((kh - 1) // 2, (kw - 1) // 2):
            k += f"p{ph}x{pw}"
        return f"conv{cin}-{self.cout}-{k}{s}g{self.groups}-{h}x{w}{tail}"

    def to_dict(self) -> Dict:
        return {"op": self.op, "cin": list(self.cin), "hw": list(self.hw), "cout": self.cout,
                "kernel": list(self.kernel), "stride": list(self.stride), "padding": list(self.padding),
                "groups": self.groups, "residual": self.residual, "relu": self.relu,
                "pitches": list(self.pitches), "offsets": list(self.offsets), "out_hw": list(self.out_hw),
                "weight_shape": list(self.weight_shape)}

    @classmethod
    def from_dict(cls, d: Dict) -> "OpShape":
        return cls(op=d["op"], cin=tuple(d["cin"]), hw=tuple(d["hw"]), cout=int(d["cout"]),
                   kernel=tuple(d["kernel"]), stride=tuple(d["stride"]), padding=tuple(d["padding"]),
                   groups=int(d["groups"]), residual=d["residual"], relu=bool(d["relu"]),
                   pitches=tuple(d.get("pitches") or d["cin"]), offsets=tuple(d.get("offsets") or ()))


@dataclass(frozen=True)
class LayerRecord:
    model: str
    name: str
    shape: OpShape


@dataclass
class ShapeEntry:
    """A distinct shape, at a given batch, and the layers (``model:layer``) that have it."""

    shape: OpShape
    batch: int
    count: int = 0
    layers: List[str] = field(default_factory=list)
    models: List[str] = field(default_factory=list)

    def model_counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for layer in self.layers:
            m = layer.split(":", 1)[0]
            out[m] = out.get(m, 0) + 1
        return out

    def to_dict(self) -> Dict:
        n = self.batch
        return {"shape": self.shape.to_dict(), "label": self.shape.label(), "id": self.shape.ident(),
                "batch": n, "count": self.count, "layers": list(self.layers), "models": list(self.models),
                "model_counts": self.model_counts(),
                "input_shapes": [list(s) for s in self.shape.input_shapes(n)],
                "output_shape": list(self.shape.output_shape(n)), "flops": self.shape.flops(n)}


HW = Union[int, str, Tuple[int, int], Sequence[int]]


def parse_hw(hw: HW) -> Tuple[int, int]:
    """An input size as ``(H, W)``: from an int (square), ``"HxW"`` / ``"H"`` or a pair."""
    orig = hw
    if isinstance(hw, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+)\s*)?", hw)
        if not m:
            raise ValueError(f"input size {orig!r} is not H, HxW or (H, W) with positive integers (e.g. 224, "
                             f"512x512, 608x1088)")
        hw = (int(m.group(1)), int(m.group(2) or m.group(1)))
    if isinstance(hw, int) and not isinstance(hw, bool):
        hw = (hw, hw)
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):  # not a pair of integers
        raise ValueError(f"input size {orig!r} is not H, HxW or (H, W) with positive integers (e.g. 224, 512x512, "
                         f"608x1088)") from None
    if h < 1 or w < 1:
        raise ValueError(f"input size {orig!r} must be positive")
    return (h, w)


def _pitch(t: torch.Tensor) -> int:
    """Channel pitch of an NHWC-strided tensor: elements between two pixels (== C when contiguous)."""
    n, c, h, w = t.shape
    if t.stride(1) == 1 and (w == 1 or t.stride(3) >= c) and (h == 1 or t.stride(2) == w * t.stride(3)):
        return int(t.stride(3)) if w > 1 else (int(t.stride(2)) if h > 1 else c)
    return c  # not NHWC at all: the kernels see it after a layout copy, so treat it as contiguous


def _offset(t: torch.Tensor) -> int:
    """First channel of a channel-slice view (its storage offset within a pixel's channel run)."""
    p = _pitch(t)
    return int(t.storage_offset() % p) if p != t.shape[1] else 0


def _record(module, args, kwargs) -> OpShape:
    params = dict(zip(("inp", "residual"), args))
    params.update(kwargs)
    inp, residual = params["inp"], params.get("residual")
    if isinstance(module, FusedAggregate):
        kids = list(inp)
        if residual is None:
            res = "none"
        elif residual is kids[0]:
            res = "child0"
        else:
            res = "tensor"
        split = tuple(int(k.shape[1]) for k in kids)
        if split != tuple(module.split):
            raise AssertionError(f"aggregate saw children {split} but records split {module.split}")
        return OpShape("aggregate", split, tuple(kids[0].shape[2:]), int(module.weight.shape[0]),
                       residual=res, relu=bool(module.relu), pitches=tuple(_pitch(k) for k in kids),
                       offsets=tuple(_offset(k) for k in kids))
    if not isinstance(module, FusedConvBnAct):
        raise TypeError(f"unexpected fused layer type {type(module).__name__}")
    x = inp
    co, _, kh, kw = module.weight.shape
    return OpShape("conv_bn_act", (int(x.shape[1]),), tuple(x.shape[2:]), int(co), (int(kh), int(kw)),
                   tuple(module.stride), tuple(module.padding), int(module.groups),
                   "none" if residual is None else "tensor", bool(module.relu), (_pitch(x),), (_offset(x),))


def _check_model(name: str) -> None:
    from . import list_models
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")


@functools.lru_cache(maxsize=None)
def _meta_model(name: str):
    """``name``'s optimized model (eager backend), moved to the meta device: the weights' shapes without their
    memory, so that a forward at any input size only propagates shapes and strides. Built once per variant."""
    from . import create_model, optimize
    with torch.random.fork_rng(devices=[]):  # CPU only: needs no CUDA context
        torch.manual_seed(0)
        fused = optimize(create_model(name).eval(), dtype=torch.float32, backend="eager")
    return fused.to("meta")


@functools.lru_cache(maxsize=None)
def _layer_records(name: str, hw: Tuple[int, int]) -> Tuple[LayerRecord, ...]:
    fused = _meta_model(name)
    # The ops with a shape to benchmark (the trees' max-pools are planned too, but have no kernel choice to time).
    layers = [(n, m) for n, m in fused.fused_layers() if isinstance(m, (FusedConvBnAct, FusedAggregate))]
    seen: Dict[str, List[OpShape]] = {n: [] for n, _ in layers}
    order: List[Tuple[str, OpShape]] = []
    handles = []
    for lname, mod in layers:
        def hook(m, args, kwargs, lname=lname):
            s = _record(m, args, kwargs)
            seen[lname].append(s)
            order.append((lname, s))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        # On the meta device the fused layers return channels_last outputs, as their kernels do, so the Res2Net
        # slices keep their pitch.
        with torch.no_grad():
            fused(torch.empty(1, fused.in_chans, *hw, device="meta"))
    finally:
        for hd in handles:
            hd.remove()
    # A layer skipped or run twice would make the per-model counts (and any time-weighted total) wrong.
    bad = {n: len(v) for n, v in seen.items() if len(v) != 1}
    if bad:
        raise RuntimeError(f"{name}: fused layers not called exactly once in a forward: {bad}")
    return tuple(LayerRecord(name, n, s) for n, s in order)


def layer_records(name: str, hw: HW = 224) -> Tuple[LayerRecord, ...]:
    """Every fused layer of ``name``'s optimized model, in execution order, with the shape it is called at for
    an input of spatial size ``hw``. ValueError for an unknown variant or a size the model rejects."""
    _check_model(name)
    return _layer_records(name, parse_hw(hw))


def distinct_shapes(names: Sequence[str] = ("dla34", "dla60"), batch: int = 256, hw: HW = 224) -> List[ShapeEntry]:
    """The distinct op shapes of the given variants (first-seen order), each with its layer count and names."""
    if isinstance(names, str):
        names = (names,)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    hw = parse_hw(hw)
    entries: Dict[OpShape, ShapeEntry] = {}
    for name in names:
        for rec in layer_records(name, hw):
            e = entries.get(rec.shape)
            if e is None:
                e = entries[rec.shape] = ShapeEntry(rec.shape, int(batch))
            e.count += 1
            e.layers.append(f"{name}:{rec.name}")
            if name not in e.models:
                e.models.append(name)
    ids = [e.shape.ident() for e in entries.values()]
    if len(set(ids)) != len(ids):  # results are keyed by it
        raise AssertionError(f"two distinct shapes share an id: {sorted(i for i in ids if ids.count(i) > 1)}")
    return list(entries.values())


def format_table(entries: Sequence[ShapeEntry], max_layers: int = 3) -> str:
    head = ["#", "op", "inputs (NCHW)", "weight", "k", "s", "p", "g", "res", "relu", "output", "n", "GFLOP",
            "layers"]
    rows = []
    for i, e in enumerate(entries):
        s, n = e.shape, e.batch
        ins = " + ".join("x".join(map(str, t)) for t in s.input_shapes(n))
        if s.pitches != s.cin:
            ins += " (pitch " + "/".join(f"{p}@{o}" if o else str(p) for p, o in zip(s.pitches, s.offsets)) + ")"
        lay = ", ".join(e.layers[:max_layers]) + (f", +{len(e.layers) - max_layers}" if len(e.layers) > max_layers
                                                  else "")
        rows.append([str(i), "agg" if s.op == "aggregate" else "conv", ins, "x".join(map(str, s.weight_shape)),
                     f"{s.kernel[0]}x{s.kernel[1]}", str(s.stride[0]), str(s.padding[0]), str(s.groups),
                     s.residual, "y" if s.relu else "n", "x".join(map(str, s.output_shape(n))), str(e.count),
                     f"{s.flops(n) / 1e9:.2f}", lay])
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(head)]
    def line(r):
        return "| " + " | ".join(c.ljust(widths[j]) for j, c in enumerate(r)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import list_models
    p = argparse.ArgumentParser(prog="python -m dla_fast.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["dla34", "dla60"], help="variants, or 'all' (default: dla34 dla60)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hw", nargs="+", default=["224"], help="input size: H, HxW or H W (default 224)")
    p.add_argument("--all-layers", action="store_true", help="list every layer name, not the first three")
    a = p.parse_args(argv)
    models = list_models() if a.models == ["all"] else a.models
    try:
        hw = parse_hw(a.hw[0] if len(a.hw) == 1 else a.hw)
        entries = distinct_shapes(models, batch=a.batch, hw=hw)
    except ValueError as e:  # an unknown variant, a bad batch, an input size the model rejects
        p.error(str(e))
    print(format_table(entries, max_layers=10 ** 6 if a.all_layers else 3))
    tot = sum(e.count for e in entries)
    per = ", ".join(f"{m}: {len(layer_records(m, hw))} layers, "
                    f"{sum(r.shape.flops(a.batch) for r in layer_records(m, hw)) / 1e12:.2f} TFLOP"
                    for m in models)
    print(f"\n{len(entries)} distinct shapes over {tot} layers ({per}; batch {a.batch}, input {hw[0]}x{hw[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
