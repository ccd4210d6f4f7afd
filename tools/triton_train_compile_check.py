"""Compile the Triton training kernels for a GPU without one: a developer tool, not package code.

    python tools/triton_train_compile_check.py [--arch 90] [--sass] [--models all] [--match REGEX]

The training counterpart of ``tools/triton_compile_check.py`` (whose recorder and compiler it reuses): runs the
training launchers (:mod:`dla_fast.backends.triton._train`) on ``meta`` tensors of every distinct conv shape
of the chosen variants, plus each aggregation root as the 1x1 conv over its concatenated children, with and
without the BN+ReLU prologue, and the BN apply / backward kernels on the outputs; records each launch and
compiles each specialisation once for the target (default sm_90), reporting compile errors, shared memory and,
with ``--sass``, instruction counts (HGMMA, LDGSTS, spills).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton_compile_check import _meta_input, _Recorder, _report  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for, e.g. 90 or 80")
    ap.add_argument("--sass", action="store_true", help="count SASS instructions (HGMMA, HMMA, LDGSTS, spills)")
    ap.add_argument("--dtype", default="float16,bfloat16", help="comma list")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--models", nargs="+", default=["all"], help="variants whose layer shapes to compile")
    ap.add_argument("--hw", default="224", help="input size, H or HxW (default 224)")
    ap.add_argument("--match", default="", help="only the shapes whose label or id matches this regular expression")
    args = ap.parse_args(argv)
    import dla_fast
    from dla_fast import shapes
    from dla_fast.backends.triton import _launch, _train

    models = dla_fast.list_models() if args.models == ["all"] else args.models
    dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
    pat = re.compile(args.match)
    entries = [e for e in shapes.distinct_shapes(models, batch=args.batch, hw=args.hw)
               if pat.search(e.shape.label()) or pat.search(e.shape.ident())]
    if not entries:
        ap.error(f"--match {args.match!r} selects none of the shapes of {', '.join(models)}")
    rec = _Recorder()
    _launch.wrap_triton = rec  # launches are recorded, not run (the training launchers go through _launch._kernel)
    failures, seen, skipped = 0, set(), 0
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for e in entries:
            s, n = e.shape, args.batch
            if s.op == "aggregate":  # the root's 1x1 conv over the concatenated children
                x = _meta_input(n, s.cin_total, s.cin_total, 0, s.hw, dtype)
                wshape, stride, padding, groups = (s.cout, s.cin_total, 1, 1), (1, 1), (0, 0), 1
            else:
                x = _meta_input(n, s.cin[0], s.pitches[0], s.offsets[0], s.hw, dtype)
                wshape, stride, padding, groups = s.weight_shape, s.stride, s.padding, s.groups
            cin = x.shape[1]
            if _train.train_conv_kind(cin // groups, s.cout // groups, groups) is None:
                skipped += 1
                continue
            w = torch.empty(wshape, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
            vec = [torch.empty(cin, device="meta") for _ in range(3)]
            cvec = [torch.empty(s.cout, device="meta") for _ in range(3)]
            rec.calls.clear()
            for norm, relu in ((None, False), (vec, True)):
                z, _, _ = _train.conv_stats_launch(x, w, stride, padding, groups, norm, relu)
            res = torch.empty(n, *z.shape[2:], s.cout, device="meta", dtype=dtype).permute(0, 3, 1, 2)
            for r in (None, res):
                y = _train.bn_act_launch(z, cvec[0], cvec[1], cvec[2], r, s.relu, dtype)
                _train.bn_backward_launch(y, y if s.relu else None, z, cvec[0], cvec[1], cvec[2],
                                          None if r is None else dtype)
            for kernel, a, kw in rec.calls:
                failures += _report(f"{s.label()} {dname}", kernel, a, kw, args, seen)
    print(f"{len(seen)} training-kernel specialisations of {len(entries)} shapes compiled for sm_{args.arch} "
          f"({skipped} shapes without a training kernel): {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
