"""Compile the kernels for a GPU without one: a developer tool, not used at run time.

    python -m dla_fast.backends.triton._aot_check [--arch 90] [--sass]

Runs the real launchers on ``meta`` tensors of the DLA shapes, records each launch instead of running it,
and compiles the recorded specialisation with ``triton.compile`` for the target (default sm_90). It
catches compile errors, shared-memory overflows and register spills on a machine with no GPU, and with
``--sass`` counts the instructions that tell which path a kernel took (HGMMA = Hopper wgmma, HMMA = mma.sync,
LDGSTS = cp.async, local memory = spills).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Tuple

import torch

_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--dtype", default="float16,bfloat16,float32")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--only", default="", help="substring of the shape names to compile")
    ap.add_argument("--sms", type=int, default=132, help="SM count the tile plans assume (split-K; H100 SXM: 132)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    from . import _launch
    from ._shapes import AGG_SHAPES, CONV_SHAPES

    rec = _Recorder()
    _launch.wrap_triton = rec  # launches are recorded, not run
    _launch._sm_count = lambda device: args.sms
    dev = torch.device("meta")
    failures = 0
    seen = set()
    for dname in args.dtype.split(","):
        dtype = getattr(torch, dname)
        for tf32 in ([False, True] if dtype == torch.float32 else [True]):
            for s in CONV_SHAPES:
                if args.only not in s["name"]:
                    continue
                cin, cout, h, k, st, p, g = s["cin"], s["cout"], s["h"], s["k"], s["stride"], s["pad"], s["groups"]
                x = torch.empty(args.batch, cin, h, h, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
                w = torch.empty(cout, cin // g, k, k, device=dev, dtype=dtype).contiguous(
                    memory_format=torch.channels_last)
                b = torch.empty(cout, device=dev)
                ho = (h + 2 * p - k) // st + 1
                r = torch.empty(args.batch, cout, ho, ho, device=dev, dtype=dtype).contiguous(
                    memory_format=torch.channels_last)
                rec.calls.clear()
                _launch.conv_launch(x, w, b, (st, st), (p, p), g, r, True, tf32)
                for kernel, a, kw in rec.calls:
                    failures += _report(f"conv {s['name']} {dname} tf32={tf32}", kernel, a, kw, args, seen)
            for s in AGG_SHAPES:
                if args.only not in s["name"]:
                    continue
                kids = [torch.empty(args.batch, c, s["h"], s["h"], device=dev, dtype=dtype).contiguous(
                    memory_format=torch.channels_last) for c in s["children"]]
                w = torch.empty(s["cout"], sum(s["children"]), device=dev, dtype=dtype)
                b = torch.empty(s["cout"], device=dev)
                rec.calls.clear()
                if s["shortcut"] == "res":
                    res = torch.empty(args.batch, s["cout"], s["h"], s["h"], device=dev, dtype=dtype).contiguous(
                        memory_format=torch.channels_last)
                else:
                    res = kids[0] if s["shortcut"] else None
                _launch.aggregate_launch(kids, w, b, res, True, tf32)
                for kernel, a, kw in rec.calls:
                    failures += _report(f"agg {s['name']} {dname} tf32={tf32}", kernel, a, kw, args, seen)
    print(f"{failures} failures")
    return 1 if failures else 0


def _report(label, kernel, a, kw, args, seen) -> int:
    consts = tuple(sorted((k, v) for k, v in kw.items()))
    key = (getattr(kernel, "__name__", str(kernel)), consts,
           tuple(str(v.dtype) if isinstance(v, torch.Tensor) else (v % 16 == 0 if isinstance(v, int) else v)
                 for v in a))
    if key in seen:
        return 0
    seen.add(key)
    try:
        c = _compile(kernel, a, dict(kw), args.arch)
    except Exception as e:  # report and go on: one bad specialisation must not hide the others
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}")
        return 1
    meta = {k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "MODE", "GB", "COG", "SPLIT", "num_warps",
                                 "num_stages") if k in kw}
    line = f"ok   {label}: smem={c.metadata.shared} {meta}"
    if args.sass:
        line += f" {_sass_stats(c.asm['cubin'])}"
    print(line)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
