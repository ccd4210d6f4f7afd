"""Compile the Triton training kernels for a GPU without one: a developer tool, not package code.

    python tools/triton_train_compile_check.py [--arch 90] [--sass] [--models all] [--match REGEX]

The training counterpart of ``tools/triton_compile_check.py`` (whose recorder and compiler it reuses): runs the
training launchers (:mod:`dla_fast.backends.triton._train`) on ``meta`` tensors of every distinct layer shape
of the chosen variants (:func:`record_training`: the statistics conv with and without the BN+ReLU prologue and
the statistics pass over a conv output, the aggregation node over its children in place, BN apply / backward
on the outputs, BN backward with the ReLU's mask read or recomputed and with a shared residual, the shared
input's 1x1 data gradient, the thin front convs' data and weight gradients, and the trees' max-pool backward, with and
without a shared input); records each launch and compiles each specialisation once for the target (default
sm_90), reporting compile errors, shared memory and, with ``--sass``, instruction counts (HGMMA, LDGSTS, spills).
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


def record_training(s, n: int, dtype: torch.dtype, tf32: bool = True) -> bool:
    """Run the training launchers of one layer shape ``s`` (a :class:`dla_fast.shapes.OpShape`) at batch ``n`` on
    meta tensors, so that their launches reach whatever ``_launch.wrap_triton`` is (a recorder): the statistics
    conv with and without the BN+ReLU prologue (and the statistics pass over a conv output, which follows the
    CUDA stem), or the aggregation node over its children read in place; then BN + ReLU apply and its backward,
    with and without a residual. False when the shape has no training kernel (the training path runs eager)."""
    from dla_fast.backends.triton import _launch, _train
    from dla_fast.train import _autograd as _ag

    if s.op == "aggregate":
        xs = [_meta_input(n, c, p, o, s.hw, dtype) for c, p, o in zip(s.cin, s.pitches, s.offsets)]
        if _train.train_conv_kind(s.cin_total, s.cout, 1) is None:
            return False
        w = torch.empty(s.cout, s.cin_total, 1, 1, device="meta", dtype=dtype)
        z, _, _ = _train.agg_stats_launch(xs, w, tf32)
    else:
        x = _meta_input(n, s.cin[0], s.pitches[0], s.offsets[0], s.hw, dtype)
        cin, groups = x.shape[1], s.groups
        if _train.train_conv_kind(cin // groups, s.cout // groups, groups) is None:
            return False
        w = torch.empty(s.weight_shape, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
        vec = [torch.empty(cin, device="meta") for _ in range(3)]
        for norm, relu in ((None, False), (vec, True)):
            z, _, _ = _train.conv_stats_launch(x, w, s.stride, s.padding, groups, norm, relu, tf32)
        _train.tensor_stats_launch(z)
        # the final launch finishing the layer's BN (coefficients, running statistics, counter)
        c = [torch.empty(s.cout, device="meta") for _ in range(3)]
        fold = _train.BnFold(c[0], 1e-5, c[1], c[2], torch.empty((), device="meta", dtype=torch.int64), 0.1, 2)
        _train.conv_stats_launch(x, w, s.stride, s.padding, groups, None, False, tf32, fold=fold)
        if _ag.shares_dgrad(x, w, s.stride, s.padding, groups):
            # the shared input's data gradient: the conv of dz with the flipped, transposed weight, x's other
            # gradient added in its epilogue
            _launch.conv_launch(z, w.flip(2, 3).transpose(0, 1), None, (1, 1), s.padding, 1, x, False, tf32)
            if x.shape[1] <= _train.WGRAD_MAX_CIN:  # a thin conv's data gradient alone (DLA_FAST_TRAIN_DGRAD=triton)
                _launch.conv_launch(z, w.flip(2, 3).transpose(0, 1), None, (1, 1), s.padding, 1, None, False, tf32)
        if _train.wgrad_thin_ok(w.shape, groups):  # the front's weight gradient (DLA_FAST_TRAIN_WGRAD=triton)
            _train.wgrad_thin_launch(z, x, w, s.stride, s.padding, tf32)
    cvec = [torch.empty(s.cout, device="meta") for _ in range(3)]
    res = torch.empty(n, *z.shape[2:], s.cout, device="meta", dtype=dtype).permute(0, 3, 1, 2)
    for r in (None, res):
        y = _train.bn_act_launch(z, cvec[0], cvec[1], cvec[2], r, s.relu, dtype)
        _train.bn_backward_launch(y, y if s.relu else None, z, cvec[0], cvec[1], cvec[2],
                                  None if r is None else dtype)
    # the residual shared with a later reader: its gradient added as the apply pass writes the residual's
    _train.bn_backward_launch(y, y if s.relu else None, z, cvec[0], cvec[1], cvec[2], dtype, res_extra=res)
    _train.bn_backward_launch(y, None, z, cvec[0], cvec[1], None, None)  # no ReLU, affine=False
    if s.relu:  # the ReLU's mask recomputed from z (no residual)
        _train.bn_backward_launch(y, None, z, cvec[0], cvec[1], cvec[2], None, relu_coef=(cvec[1], cvec[2]))
    return True


# The trees' max-pool inputs (channels, size at 224x224) of the DLA variants: level 1's 32 channels at 112 (dla34),
# then the wider levels; the kernel specialises on the channel tile (32 or 64) and the dtype.
POOL_INPUTS = ((32, 112), (64, 56), (128, 56), (128, 28), (256, 28), (256, 14), (512, 14), (1024, 7))


def record_pools(n: int, dtype: torch.dtype, hw: int = 224) -> None:
    """The trees' 2x2 max-pool backward (the forward is the inference kernel) at batch ``n``, meta tensors."""
    from dla_fast.backends.triton import _train

    for c, size in POOL_INPUTS:
        size = size * hw // 224
        x = torch.empty(n, size, size, c, device="meta", dtype=dtype).permute(0, 3, 1, 2)
        g = torch.empty(n, size // 2, size // 2, c, device="meta", dtype=dtype).permute(0, 3, 1, 2)
        _train.max_pool_backward_launch(x, g, 2)
        _train.max_pool_backward_launch(x, g, 2, extra=x)  # the pooled input shared with the tree's first block


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
    from dla_fast.backends.triton import _launch

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
            rec.calls.clear()
            if not record_training(e.shape, args.batch, dtype):
                skipped += 1
                continue
            for kernel, a, kw in rec.calls:
                failures += _report(f"{e.shape.label()} {dname}", kernel, a, kw, args, seen)
        rec.calls.clear()
        record_pools(args.batch, dtype, int(args.hw.split("x")[0]))
        for kernel, a, kw in rec.calls:
            failures += _report(f"max-pool backward {dname}", kernel, a, kw, args, seen)
    print(f"{len(seen)} training-kernel specialisations of {len(entries)} shapes compiled for sm_{args.arch} "
          f"({skipped} shapes without a training kernel): {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
