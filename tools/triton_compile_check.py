"""Compile the Triton backend's kernels for a GPU without one: a developer tool, not package code.

    python tools/triton_compile_check.py [--arch 90] [--sass] [--models all] [--match REGEX] [--front]

Runs the real launchers on ``meta`` tensors of the DLA layer shapes (:mod:`dla_fast.shapes`, every distinct
shape of the chosen variants), records each launch instead of running it, and compiles each recorded
specialisation once with ``triton.compile`` for the target (default sm_90). It
catches compile errors, shared-memory overflows and register spills on a machine with no GPU, and with
``--sass`` counts the instructions that tell which path a kernel took (HGMMA = Hopper wgmma, HMMA = mma.sync,
LDGSTS = cp.async, local memory = spills).

``--aliasing`` checks instead of compiling, with the training launchers recorded too: no two arguments that torch's
TTIR analysis says a kernel may write share memory. torch.compile's functionalization clones each such argument,
runs the kernel on the clones and copies them back, so a tensor passed twice (a real one and a placeholder for an
unused pointer) can come back as the stale copy.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Tuple

# The Triton kernels are compiled, not interpreted, only if TRITON_INTERPRET is off when they are defined.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

if __package__ in (None, ""):  # run as a script: the repository's dla_fast even when it is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}


class _Recorder:
    def __init__(self):
        self.calls: List[Tuple[Any, list, dict]] = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    rec.calls.append((kernel, list(args), dict(kwargs)))
                return launch
        return _Grid()


def _compile(kernel, args, kwargs, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if hasattr(kernel, "fn") and not hasattr(kernel, "arg_names") else kernel
    names = fn.arg_names
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    vals = dict(zip(names, args))
    vals.update(kwargs)
    sig, consts, attrs = {}, {}, {}
    for i, (name, p) in enumerate(zip(names, fn.params)):
        v = vals[name]
        if p.is_constexpr:
            sig[name] = "constexpr"
            consts[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _DT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(v)}")
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def _sass_stats(cubin: bytes) -> Dict[str, int]:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    out = {k: len(re.findall(pat, sass)) for k, pat in
           [("HGMMA", r"\bHGMMA\b"), ("HMMA", r"\bHMMA\b"), ("FFMA", r"\bFFMA\b"), ("LDGSTS", r"\bLDGSTS\b"),
            ("LDG", r"\bLDG\b"), ("LDL/STL", r"\b(?:LDL|STL)\b"), ("SHFL", r"\bSHFL\b")]}
    m = re.search(r"REG:(\d+)", res)
    out["regs"] = int(m.group(1)) if m else -1
    m = re.search(r"STACK:(\d+)", res)
    out["stack"] = int(m.group(1)) if m else -1
    return out


def _meta_input(n: int, c: int, pitch: int, offset: int, hw, dtype) -> torch.Tensor:
    # NHWC, and a channel slice of a wider tensor where the layer reads one (Res2Net): the kernels specialise
    # on the strides and the pointer's alignment.
    return torch.empty(n, *hw, pitch, device="meta", dtype=dtype).permute(0, 3, 1, 2)[:, offset:offset + c]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for, e.g. 90 or 80")
    ap.add_argument("--sass", action="store_true", help="count SASS instructions (HGMMA, HMMA, LDGSTS, spills)")
    ap.add_argument("--dtype", default="float16,bfloat16,float32", help="comma list")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--models", nargs="+", default=["all"], help="variants whose layer shapes to compile")
    ap.add_argument("--hw", default="224", help="input size, H or HxW (default 224)")
    ap.add_argument("--match", default="", help="only the shapes whose label or id matches this regular expression")
    ap.add_argument("--sms", type=int, default=132, help="SM count the tile plans assume (split-K; H100 SXM: 132)")
    ap.add_argument("--front", action="store_true", help="also the fused front (stem + level 0 + level 1) with every "
                    "tile config worth timing, at --batch x 3 x --hw")
    ap.add_argument("--aliasing", action="store_true", help="instead of compiling, check that no two arguments a "
                    "kernel may write alias (what torch.compile's functionalization needs); adds the training "
                    "launchers")
    args = ap.parse_args(argv)
    import dla_fast
    from dla_fast import shapes
    from dla_fast.backends.triton import _launch

    models = dla_fast.list_models() if args.models == ["all"] else args.models
    try:
        dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
        if any(not isinstance(d, torch.dtype) for d in dtypes):
            raise AttributeError
    except AttributeError:
        ap.error(f"--dtype {args.dtype!r}: use a comma list of float16, bfloat16, float32")
    try:
        pat = re.compile(args.match)
        entries = [e for e in shapes.distinct_shapes(models, batch=args.batch, hw=args.hw)
                   if pat.search(e.shape.label()) or pat.search(e.shape.ident())]
    except (ValueError, re.error) as e:
        ap.error(str(e))
    if not entries:
        ap.error(f"--match {args.match!r} selects none of the shapes of {', '.join(models)}")
    if args.aliasing:  # the training launchers' recording lives beside this tool
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from triton_train_compile_check import record_training
    rec = _Recorder()
    _launch.wrap_triton = rec  # launches are recorded, not run
    _launch._sm_count = lambda device: args.sms
    failures = 0
    seen = set()
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for tf32 in ([False, True] if dtype == torch.float32 else [True]):
            for e in entries:
                s, n = e.shape, args.batch
                xs = [_meta_input(n, c, p, o, s.hw, dtype) for c, p, o in zip(s.cin, s.pitches, s.offsets)]
                b = torch.empty(s.cout, device="meta")
                res = None
                if s.residual == "tensor":
                    res = torch.empty(n, *s.out_hw, s.cout, device="meta", dtype=dtype).permute(0, 3, 1, 2)
                elif s.residual == "child0":
                    res = xs[0]
                rec.calls.clear()
                if s.op == "aggregate":
                    w = torch.empty(s.cout, s.cin_total, device="meta", dtype=dtype)
                    _launch.aggregate_launch(xs, w, b, res, s.relu, tf32)
                else:
                    w = torch.empty(s.weight_shape, device="meta", dtype=dtype).contiguous(
                        memory_format=torch.channels_last)
                    _launch.conv_launch(xs[0], w, b, s.stride, s.padding, s.groups, res, s.relu, tf32)
                if args.aliasing and dtype != torch.float32:  # training runs fp16/bf16 autocast
                    record_training(s, n, dtype, tf32)
                for kernel, a, kw in rec.calls:
                    failures += _report(f"{s.label()} {dname} tf32={tf32}", kernel, a, kw, args, seen)
    if args.front:
        failures += _front_check(args, dtypes, rec, seen)
    what = "checked for aliased written arguments" if args.aliasing else "compiled"
    print(f"{len(seen)} kernel specialisations of {len(entries)} shapes{' and the front' if args.front else ''} "
          f"{what} for sm_{args.arch}: {failures} failures")
    return 1 if failures else 0


def _front_check(args, dtypes, rec, seen) -> int:
    """The front kernel of every candidate config (the heuristic's first) for each dtype: DLA's 3 -> 16 -> 16 -> 32
    channels, at the batch and input size asked for."""
    from dla_fast import shapes
    from dla_fast.backends.triton import _front

    _front._sm_count = lambda device: args.sms
    h, w = shapes.parse_hw(args.hw)
    failures = 0
    for dtype in dtypes:
        for tf32 in ([False, True] if dtype == torch.float32 else [True]):
            x = torch.empty(args.batch, h, w, 3, device="meta", dtype=dtype).permute(0, 3, 1, 2)
            ws = [torch.empty(co, ci, k, k, device="meta", dtype=dtype) for co, ci, k in ((16, 3, 7), (16, 16, 3),
                                                                                        (32, 16, 3))]
            bs = [torch.empty(co, device="meta") for co in (16, 16, 32)]
            for t in _front.candidates(dtype, tf32, args.sms):
                rec.calls.clear()
                _front.front_launch(x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], tf32, config=_front.config_dict(t))
                for kernel, a, kw in rec.calls:
                    label = f"{_front.describe(t)} {str(dtype).replace('torch.', '')} tf32={tf32}"
                    failures += _report(label, kernel, a, kw, args, seen)
    return failures


def _report(label, kernel, a, kw, args, seen) -> int:
    consts = tuple(sorted((k, v) for k, v in kw.items()))
    key = (getattr(kernel, "__name__", str(kernel)), consts,
           tuple(str(v.dtype) if isinstance(v, torch.Tensor) else (v % 16 == 0 if isinstance(v, int) else v)
                 for v in a))
    if key in seen:
        return 0
    seen.add(key)
    if getattr(args, "aliasing", False):
        return _alias_report(label, kernel, a, kw, args.arch)
    try:
        c = _compile(kernel, a, dict(kw), args.arch)
    except Exception as e:  # report and go on: one bad specialisation must not hide the others
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}")
        return 1
    meta = {k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "MODE", "GB", "COG", "SPLIT", "TH", "TW", "num_warps",
                                 "num_stages") if k in kw}
    line = f"ok   {label}: smem={c.metadata.shared} {meta}"
    if args.sass:
        line += f" {_sass_stats(c.asm['cubin'])}"
    print(line)
    sys.stdout.flush()
    return 0


class _TargetOnly:
    """The active Triton driver as far as TTIR generation asks: the target GPU (there is none on this machine)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target


def _written(kernel, vals: Dict[str, Any], arch: int) -> List[str]:
    """The argument names torch's TTIR analysis says ``kernel`` may write (every tensor where it cannot tell)."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw
    from triton.runtime import driver

    kwargs = {k: v for k, v in vals.items() if k not in ("num_warps", "num_stages")}
    before = driver._active  # None until a driver is asked for; reset_active() would look for a GPU
    driver.set_active(_TargetOnly(arch))
    try:
        if hasattr(tkw, "identify_accessed_tensors"):
            acc = tkw.identify_accessed_tensors(kernel, kwargs, {})
            return sorted(d.name for d in acc.read_writes.writes)
        return sorted(tkw.identify_mutated_tensors(kernel, kwargs, {}))
    finally:
        driver._active = before


def _alias_report(label, kernel, a, kw, arch: int) -> int:
    fn = kernel.fn if hasattr(kernel, "fn") and not hasattr(kernel, "arg_names") else kernel
    vals = dict(zip(fn.arg_names, a))
    vals.update(kw)
    tensors = {k: v for k, v in vals.items() if isinstance(v, torch.Tensor)}
    written = _written(fn, vals, arch)
    # Two written arguments on one tensor get one clone each, and the copy-back of the one the kernel did not
    # write wins or loses by order. (A written argument aliasing a read-only one is sound: the kernel reads the
    # original, as it would have before writing.)
    clashes = [(w, o) for i, w in enumerate(written) for o in written[i + 1:]
               if tensors[o].untyped_storage()._cdata == tensors[w].untyped_storage()._cdata]
    name = getattr(fn, "__name__", str(fn))
    if clashes:
        print(f"FAIL {label} {name}: written arguments alias each other: {clashes} (writes {written})")
        return 1
    print(f"ok   {label} {name}: writes {written}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
