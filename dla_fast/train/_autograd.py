"""The autograd functions of the training path and the two implementations each of their pieces.

A conv -> BatchNorm(train) -> ReLU layer is two functions:

``ConvStats``  z, mean, var = conv2d(x', w) and z's per-channel batch statistics (fp32), where x' is x or,
               with a prologue, the previous layer's BN + ReLU applied to x as it is read (x is then that
               layer's raw conv output and the prologue's statistics are x's own).
``BnAct``      y = act(BN(z; mean, var, gamma, beta) + residual).

An aggregation node (DLA's root: 1x1 conv over the concat of its children) is ``AggStats`` (z, mean, var of
``conv1x1(cat(children), w)``, the children read in place) followed by the same ``BnAct``. ``MaxPool`` is the
trees' downsampling (K x K, stride K) on the Triton kernels, forward and backward.

``mean``/``var`` leave ``ConvStats`` as non-differentiable outputs: every consumer of them (``BnAct``, the next
``ConvStats``'s prologue) is a BatchNorm of that same ``z`` and returns the full BN input gradient, the terms
through the batch statistics included, computed in fp32 and rounded once, as cuDNN's BN backward does. Passing
statistics that are not ``z``'s own is therefore an error of the caller; :mod:`dla_fast.train.ops` only builds
the valid combinations.

Each piece has a Triton implementation (``dla_fast.backends.triton._train``) and a torch one below. The torch
pieces are the same formulas in ATen ops: the oracle of the kernel tests, and with them the functions run in
float64 for ``gradcheck`` of the hand-written backward. The convolution's own backward is ATen's
``convolution_backward`` in both. The backwards are not differentiable themselves (``once_differentiable``: a
double backward raises rather than returning wrong second derivatives).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IMPLS = ("triton", "torch")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """BatchNorm statistics are fp32 for fp16/bf16/fp32 tensors (as ATen/cuDNN keep them), fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------- torch pieces

def _c(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


def bn_act_torch(z: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 residual: Optional[torch.Tensor], relu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    sd = mean.dtype
    v = (z.to(sd) - _c(mean)) * _c(scale) + _c(bias)
    if residual is not None:
        v = v + residual.to(sd)
    if relu:
        v = torch.relu(v)
    return v.to(out_dtype).contiguous(memory_format=torch.channels_last)


def conv_stats_torch(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                     groups: int, norm: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     norm_relu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = x if norm is None else bn_act_torch(x, *norm, None, norm_relu, x.dtype)
    z = F.conv2d(a, weight, None, tuple(stride), tuple(padding), 1, groups)
    zs = z.to(stats_dtype(z.dtype))
    mean = zs.mean((0, 2, 3))
    var = (zs - _c(mean)).square().mean((0, 2, 3))
    return z.contiguous(memory_format=torch.channels_last), mean, var


def agg_stats_torch(children: Sequence[torch.Tensor], weight: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return conv_stats_torch(torch.cat(list(children), 1), weight, (1, 1), (0, 0), 1, None, False)


def _pre_relu(d: torch.Tensor, coef) -> torch.Tensor:
    """A BN's output before its ReLU, ``d * scale + bias`` from ``d`` = z - mean (in the statistics' dtype) and
    ``coef`` = (scale, bias): where it is > 0 the ReLU passes the gradient."""
    return d * _c(coef[0].to(d.dtype)) + _c(coef[1].to(d.dtype))


def bn_backward_torch(grad: torch.Tensor, y: Optional[torch.Tensor], z: torch.Tensor, mean: torch.Tensor,
                      rstd: torch.Tensor, gamma: Optional[torch.Tensor], res_dtype: Optional[torch.dtype],
                      relu_coef=None):
    """The formulas of ``_bn_bwd_reduce_kernel`` / ``_bn_bwd_apply_kernel`` in ATen ops (same contract as
    :func:`dla_fast.backends.triton._train.bn_backward_launch`)."""
    sd = mean.dtype
    g = grad.to(sd)
    d = z.to(sd) - _c(mean)
    if relu_coef is not None:
        y = _pre_relu(d, relu_coef)
    if y is not None:
        g = torch.where(y > 0, g, torch.zeros((), dtype=sd, device=g.device))
    m = z.shape[0] * z.shape[2] * z.shape[3]
    dbeta = g.sum((0, 2, 3))
    s_gx = (g * d).sum((0, 2, 3))
    k1 = rstd if gamma is None else gamma * rstd
    dz = _c(k1) * g - _c(k1 * dbeta / m) - _c(k1 * rstd * rstd * s_gx / m) * d
    dres = None if res_dtype is None else g.to(res_dtype)
    return dz.to(z.dtype), s_gx * rstd, dbeta, dres


# ------------------------------------------------------------------------------------------ dispatching

def _direct(x: torch.Tensor) -> bool:
    # Outside torch.compile the launchers run straight from Python (the registered ops only add dispatch
    # cost); traced code goes through the ops so the kernels enter the graph.
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()


def _tf32() -> bool:
    return bool(torch.backends.cudnn.allow_tf32)


def conv_on_cuda(x: torch.Tensor, weight: torch.Tensor, groups: int, norm) -> bool:
    """Whether the statistics conv runs as the CUDA extension's conv followed by a statistics pass over its
    output (fp16/bf16, no BN prologue, the extension built and running on x): for a conv of few input channels
    (the stem's 3) always, since there the Triton kernel's flat K walk gathers 3-channel pixels (the 224x224 stem
    took several times the CUDA kernel's time) while a second read of the output costs a fraction of either; for
    every other conv with DLA_FAST_TRAIN_STATS_PASS=all, which trades the Triton epilogue's statistics for one
    more read of z."""
    from .. import _env
    from ..backends.triton import _train as kt
    if norm is not None or x.dtype not in (torch.float16, torch.bfloat16) or x.device.type != "cuda":
        return False
    if (kt.train_conv_kind(weight.shape[1], weight.shape[0] // groups, groups) != "flat"
            and _env.choice("DLA_FAST_TRAIN_STATS_PASS") != "all"):
        return False
    from ..backends import cuda
    return cuda.unavailable_reason(x) is None


def _folded(out, fold):
    """(z, mean, var) -> with ``fold`` (a layer's BN, :class:`dla_fast.backends.triton._train.BnFold`): (z, mean,
    var, rstd, scale) with its running statistics updated, by torch ops: what the kernels' final launch does."""
    if fold is None:
        return out
    from .ops import update_running_stats
    z, mean, var = out
    rstd, scale, _ = _scale_bias(fold.gamma, None, var, fold.eps)
    update_running_stats(mean, var, fold.count, fold.running_mean, fold.running_var, fold.num_batches_tracked,
                         fold.factor)
    return z, mean, var, rstd, scale


def conv_stats(impl: str, x, weight, stride, padding, groups, norm, norm_relu, fold=None):
    """(z, mean, var) of the statistics conv; with ``fold`` also (rstd, scale) of the layer's BN, whose running
    statistics it updates (see :func:`_folded`)."""
    if impl == "torch":
        return _folded(conv_stats_torch(x, weight, stride, padding, groups, norm, norm_relu), fold)
    from ..backends.triton import _train as kt
    if _direct(x):
        # (Traced code keeps the one registered Triton op: the choice below is an eager-launch one.)
        if conv_on_cuda(x, weight, groups, norm):
            from ..backends import cuda
            z = cuda.conv_bn_act(x, weight, None, tuple(stride), tuple(padding), groups, None, False)
            return (z, *kt.tensor_stats_launch(z, raw=True, fold=fold))
        return kt.conv_stats_launch(x, weight, stride, padding, groups, norm, norm_relu, _tf32(), raw=True,
                                    fold=fold)
    nm, ns, nb = norm if norm is not None else (None, None, None)
    return _folded(torch.ops.dla_fast_train.conv_stats(x, weight, list(stride), list(padding), groups, nm, ns, nb,
                                                       norm_relu, _tf32()), fold)


def agg_stats(impl: str, children, weight, fold=None):
    if impl == "torch":
        return _folded(agg_stats_torch(children, weight), fold)
    from ..backends.triton import _train as kt
    if _direct(children[0]):
        return kt.agg_stats_launch(children, weight, _tf32(), raw=True, fold=fold)
    return _folded(torch.ops.dla_fast_train.agg_stats(list(children), weight, _tf32()), fold)


def shares_dgrad(x: torch.Tensor, weight: torch.Tensor, stride, padding, groups: int) -> bool:
    """Whether the backward of a conv of x can add another gradient of x inside its own data-gradient kernel
    (``share`` of :class:`ConvStats`): a dense stride-1 conv of an odd square kernel padded to keep the size
    (1x1 unpadded, 3x3 padded by 1), whose data gradient is the same conv of dz with the weight flipped and
    transposed, run on the Triton conv kernel with the other gradient as its epilogue's residual; launched from
    Python (traced code keeps autograd's sum, which Inductor fuses itself)."""
    kh, kw = weight.shape[2:]
    return (x.dim() == 4 and kh == kw and kh % 2 == 1 and tuple(stride) == (1, 1)
            and tuple(padding) == (kh // 2, kw // 2) and groups == 1 and _direct(x))


def _front_switch(var: str, x: torch.Tensor) -> bool:
    """Whether a front-gradient switch (DLA_FAST_TRAIN_DGRAD, DLA_FAST_TRAIN_WGRAD) puts x's conv on the Triton
    kernel: set to triton, or unset with x on a GPU."""
    from .. import _env
    mode = _env.choice(var)
    return mode == "triton" or (mode is None and x.device.type == "cuda")


def thin_dgrad(x: torch.Tensor, weight: torch.Tensor, stride, padding, groups: int) -> bool:
    """Whether the data gradient of a conv of x runs on the Triton conv kernel (the conv of dz with the weight
    flipped and transposed, as :func:`dgrad_onto` runs it) instead of ATen's: on a GPU unless turned off
    (DLA_FAST_TRAIN_DGRAD=aten), anywhere Triton runs when asked for (=triton: the CPU interpreter too), and a
    conv :func:`shares_dgrad` takes, on at most WGRAD_MAX_CIN input channels. In a DLA that is level 0, a 3x3 on
    16 channels at full resolution, where cuDNN's data gradient runs at about 5x its bytes."""
    if not _front_switch("DLA_FAST_TRAIN_DGRAD", x) or not shares_dgrad(x, weight, stride, padding, groups):
        return False
    from ..backends.triton import _train as kt
    return x.shape[1] <= kt.WGRAD_MAX_CIN


def thin_wgrad(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether the weight gradient of a conv of x runs on the Triton thin-conv kernel
    (:func:`dla_fast.backends.triton._train.wgrad_thin_launch`) instead of ATen's: on a GPU unless turned off
    (DLA_FAST_TRAIN_WGRAD=aten), anywhere Triton runs when asked for (=triton: the CPU interpreter too), and a
    conv the kernel takes (the DLA front: few input channels over many pixels, where cuDNN's kernels, in benchmark
    mode too, run far from the memory bound). Under torch.compile it enters the graph as a registered op, so a
    compiled step computes the same weight gradient as an uncompiled one."""
    if not _front_switch("DLA_FAST_TRAIN_WGRAD", x) or x.dim() != 4:
        return False
    from ..backends.triton import _train as kt
    return kt.wgrad_thin_ok(weight.shape, groups) and x.shape[1] == weight.shape[1]


def _wgrad(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    from ..backends.triton import _train as kt
    if _direct(x):
        return kt.wgrad_thin_launch(dz, x, weight, stride, padding, _tf32(), raw=True)
    return torch.ops.dla_fast_train.wgrad_thin(dz, x, weight, list(stride), list(padding), _tf32())


def dgrad_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight of a stride-1, size-keeping conv's data gradient as a conv of dz: input and output channels
    swapped, a k x k kernel flipped (a 1x1 needs no flip)."""
    return weight.transpose(0, 1) if weight.shape[2:] == (1, 1) else weight.flip(2, 3).transpose(0, 1)


def dgrad_onto(impl: str, dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, extra: torch.Tensor,
               need_w: bool):
    """(extra + the data gradient, the weight gradient or None) of a conv that :func:`shares_dgrad`.

    The data gradient runs as the conv of dz with the flipped, transposed weight on the Triton conv kernel,
    ``extra`` added in its epilogue: one read of ``extra`` in place of writing the data gradient and summing the
    two in a pass of their own (3 tensor passes fewer). ``extra`` None: the data gradient alone
    (:func:`thin_dgrad`). impl "torch": ATen's gradients and an add."""
    dz = dz.to(x.dtype)
    kh, kw = weight.shape[2:]
    pad = [kh // 2, kw // 2]
    aten_args = (dz, x, weight, None, [1, 1], pad, [1, 1], False, [0, 0], 1)
    if impl == "torch":
        da, dw, _ = torch.ops.aten.convolution_backward(*aten_args, [True, need_w, False])
        return (da if extra is None else da.add_(extra)), dw
    from ..backends.triton import _launch
    dw = None
    if need_w:
        dw = (_wgrad(dz, x, weight, (1, 1), pad) if thin_wgrad(x, weight, 1)
              else torch.ops.aten.convolution_backward(*aten_args, [False, True, False])[1])
    wt = dgrad_weight(weight)
    dx = _launch.conv_launch(dz, wt, None, (1, 1), pad, 1, extra, False, _tf32(), raw=True)
    return dx, dw


def _pixels(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] as its [N*H*W, C] matrix of pixels: a view for channels_last tensors and channel slices of
    them, a copy otherwise."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def bn_act(impl: str, z, mean, scale, bias, residual, relu, out_dtype):
    """BN (+ residual) (+ ReLU) apply."""
    if impl == "torch":
        return bn_act_torch(z, mean, scale, bias, residual, relu, out_dtype)
    from ..backends.triton import _train as kt
    if _direct(z):
        return kt.bn_act_launch(z, mean, scale, bias, residual, relu, out_dtype, raw=True)
    return torch.ops.dla_fast_train.bn_act(z, mean, scale, bias, residual, relu, out_dtype)


def bn_backward(impl: str, grad, y, z, mean, rstd, gamma, res_dtype, relu_coef=None, res_extra=None):
    """BN (+ ReLU) backward; the ReLU's mask from its output ``y``, or from ``z`` and ``relu_coef`` = (scale,
    bias) of a BN with no residual after it (the kernels then read one tensor fewer). ``res_extra``: another
    gradient of the residual, added to the one returned (by the kernels as they write it)."""
    if impl == "torch":
        dz, dgamma, dbeta, dres = bn_backward_torch(grad, y, z, mean, rstd, gamma, res_dtype, relu_coef)
    elif _direct(z):
        from ..backends.triton import _train as kt
        return kt.bn_backward_launch(grad, y, z, mean, rstd, gamma, res_dtype, raw=True, relu_coef=relu_coef,
                                     res_extra=res_extra)
    else:
        if relu_coef is not None:  # the registered op takes the mask as a tensor: the pre-activation, traced
            y = _pre_relu(z.to(mean.dtype) - _c(mean), relu_coef)
        dz, dgamma, dbeta, dres = torch.ops.dla_fast_train.bn_backward(grad, y, z, mean, rstd, gamma, res_dtype)
        if res_dtype is None:
            dres = None
    return dz, dgamma, dbeta, (dres if res_extra is None else dres + res_extra)


def _scale_bias(gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], var: torch.Tensor, eps: float,
                coef=None):
    """(rstd, scale, bias) of a BatchNorm in the statistics' dtype: scale = gamma / sqrt(var + eps); ``coef``:
    (rstd, scale) already computed (by the statistics' final launch)."""
    if coef is None:
        rstd = torch.rsqrt(var + eps)
        scale = rstd if gamma is None else gamma.to(var.dtype) * rstd
    else:
        rstd, scale = coef
    return rstd, scale, torch.zeros_like(var) if beta is None else beta.to(var.dtype)


def _grad_as(g: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if g is None or like is None:
        return None
    return g.to(like.dtype)


# -------------------------------------------------------------------------------------------- functions

class ConvStats(torch.autograd.Function):
    """(z, mean, var) = conv2d(x', weight) and its batch statistics; see the module docstring.

    forward(x, weight, stride, padding, groups, impl, norm_mean, norm_var, norm_gamma, norm_beta, norm_eps,
    norm_relu, fold=None, norm_coef=None, norm_prologue=True): without a prologue the ``norm_*`` tensors are None.
    Autocast must be off inside (the caller casts x and weight to the compute dtype). ``fold``: this layer's own BN
    (:class:`dla_fast.backends.triton._train.BnFold`), whose coefficients come back as two more outputs, (z,
    mean, var, rstd, scale), and whose running statistics are updated, in the statistics' final launch.
    ``norm_coef``: the prologue BN's (rstd, scale) where its own layer's final launch computed them;
    ``norm_prologue=False`` forms the normalised input in a separate pass instead (still not kept).
    ``share``: x itself comes back as one more output, last (see :func:`shares_dgrad`); the gradient that reaches
    it is added to x's by this conv's data-gradient kernel, where autograd would sum the two in a pass of its own.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding, groups, impl, norm_mean, norm_var, norm_gamma, norm_beta,
                norm_eps, norm_relu, fold=None, norm_coef=None, norm_prologue=True, share=False):
        norm = None
        rstd = scale = bias = None
        if share and norm_mean is not None:
            raise ValueError("ConvStats: share takes a conv of a formed input (no normalising prologue)")
        if norm_mean is not None:
            rstd, scale, bias = _scale_bias(norm_gamma, norm_beta, norm_var, norm_eps, norm_coef)
            norm = (norm_mean, scale, bias)
        if norm is not None and not norm_prologue:
            # The activation formed for the conv and dropped after it: kept as x only, as with the prologue.
            a = bn_act(impl, x, norm_mean, scale, bias, None, norm_relu, x.dtype)
            out = conv_stats(impl, a, weight, stride, padding, groups, None, False, fold)
            del a
        else:
            out = conv_stats(impl, x, weight, stride, padding, groups, norm, norm_relu, fold)
        ctx.mark_non_differentiable(*out[1:])
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (absent) gradients
        ctx.conf = (tuple(stride), tuple(padding), groups, impl, norm is not None, bool(norm_relu), bool(share))
        ctx.save_for_backward(x, weight, norm_mean, rstd, scale, bias, norm_gamma, norm_beta)
        # x returned as it is: autograd makes the output a view of x whose gradient comes to this backward.
        return (*out, x) if share else out

    @staticmethod
    @once_differentiable
    def backward(ctx, dz, *rest):
        stride, padding, groups, impl, has_norm, norm_relu, share = ctx.conf
        x, weight, mean, rstd, scale, bias, gamma, beta = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_g, need_b = ctx.needs_input_grad[8], ctx.needs_input_grad[9]
        dshare = rest[-1] if share else None
        dx = dw = dgamma = dbeta = None
        if dz is None:
            return (dshare if need_x else None,) + (None,) * 15
        if dshare is not None and need_x:
            dx, dw = dgrad_onto(impl, dz, x, weight, dshare, need_w)
            return (dx, dw) + (None,) * 14
        a = x
        if has_norm:
            # The normalised input was never stored: recompute it (the memory the prologue saves).
            a = bn_act(impl, x, mean, scale, bias, None, norm_relu, x.dtype)
        need_a = need_x or (has_norm and (need_g or need_b))
        da = dw = None
        if need_a and impl == "triton" and thin_dgrad(a, weight, stride, padding, groups):
            da, dw = dgrad_onto(impl, dz, a, weight, None, need_w)  # its weight gradient picks the kernel itself
        else:
            own_w = need_w and impl == "triton" and thin_wgrad(a, weight, groups)
            if need_a or (need_w and not own_w):
                da, dw, _ = torch.ops.aten.convolution_backward(
                    dz.to(a.dtype), a, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], groups,
                    [need_a, need_w and not own_w, False])
            if own_w:
                dw = _wgrad(dz, a, weight, stride, padding)
        del a  # the ReLU's mask below comes from x (no residual in a prologue)
        if has_norm and need_a:
            g32 = None if gamma is None else gamma.to(rstd.dtype)
            dx, dgamma, dbeta, _ = bn_backward(impl, da, None, x, mean, rstd, g32, None,
                                               (scale, bias) if norm_relu else None)
        elif need_x:
            dx = da
        return (dx if need_x else None, dw, None, None, None, None, None, None,
                _grad_as(dgamma, gamma) if need_g else None, _grad_as(dbeta, beta) if need_b else None, None, None,
                None, None, None, None)


class BnAct(torch.autograd.Function):
    """y = act(BatchNorm(z; mean, var, gamma, beta, eps) + residual), mean/var the batch statistics of z from
    :class:`ConvStats`. forward(z, mean, var, gamma, beta, residual, eps, relu, out_dtype, impl, coef=None);
    ``coef``: (rstd, scale) already computed (by the statistics' final launch), else computed here. The backward
    takes the ReLU's mask from ``y``, or where no residual is added from ``z`` (one read fewer). ``share`` (last
    argument): the residual comes back as a second output, whose gradient (its later readers') the backward's
    last pass adds to the residual's as it writes it (as :class:`ConvStats`' ``share``)."""

    @staticmethod
    def forward(ctx, z, mean, var, gamma, beta, residual, eps, relu, out_dtype, impl, coef=None, share=False):
        if share and residual is None:
            raise ValueError("BnAct: share needs a residual")
        rstd, scale, bias = _scale_bias(gamma, beta, var, eps, coef)
        y = bn_act(impl, z, mean, scale, bias, residual, relu, out_dtype)
        ctx.conf = (bool(relu), impl, None if residual is None else residual.dtype, bool(share))
        ctx.set_materialize_grads(False)
        mask_z = relu and residual is None
        ctx.save_for_backward(z, y if relu and not mask_z else None, mean, rstd, gamma, beta,
                              scale if mask_z else None, bias if mask_z else None)
        return (y, residual) if share else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *rest):
        relu, impl, res_dtype, share = ctx.conf
        z, y, mean, rstd, gamma, beta, scale, bias = ctx.saved_tensors
        need_z, need_g, need_b, need_r = (ctx.needs_input_grad[0], ctx.needs_input_grad[3],
                                          ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        dshare = rest[0] if share else None
        if dy is None:
            return (None,) * 5 + (dshare if need_r else None,) + (None,) * 6
        g32 = None if gamma is None else gamma.to(rstd.dtype)
        dz, dgamma, dbeta, dres = bn_backward(impl, dy, y, z, mean, rstd, g32, res_dtype if need_r else None,
                                              None if scale is None else (scale, bias),
                                              dshare if need_r else None)
        return (dz if need_z else None, None, None, _grad_as(dgamma, gamma) if need_g else None,
                _grad_as(dbeta, beta) if need_b else None, dres, None, None, None, None, None, None)


class AggStats(torch.autograd.Function):
    """(z, mean, var) = conv1x1(cat(children, 1), weight) and z's batch statistics, the concat never formed.

    forward(impl, fold, share, weight, *children), weight [Cout, sum C_i, 1, 1]; autocast off inside (the caller
    casts to the compute dtype); ``fold`` as in :class:`ConvStats` (None, or the node's BN: five outputs);
    ``share``: children[0] comes back as one more output, last, whose gradient the backward adds to that child's
    in the kernel that computes it (the node's shortcut takes it: as :class:`ConvStats`' ``share``). The backward
    writes each child's gradient ``dz @ W_i`` on its own and the weight's as the column blocks ``dz^T @ child_i``:
    one matrix product per child on the NHWC pixel matrices (no concat of inputs or gradients). The children are
    saved as they are read (a channels_last copy only for a child whose pixels do not collapse to one row stride:
    the forward makes that copy anyway)."""

    @staticmethod
    def forward(ctx, impl, fold, share, weight, *children):
        kids = [c if _pixels_ok(c) else c.contiguous(memory_format=torch.channels_last) for c in children]
        out = agg_stats(impl, kids, weight, fold)
        ctx.mark_non_differentiable(*out[1:])
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (absent) gradients
        ctx.save_for_backward(weight, *kids)
        ctx.conf = (impl, bool(share))
        return (*out, children[0]) if share else out

    @staticmethod
    @once_differentiable
    def backward(ctx, dz, *rest):
        weight, *kids = ctx.saved_tensors
        impl, share = ctx.conf
        dshare = rest[-1] if share else None
        if dz is None:
            return (None,) * 4 + (dshare if ctx.needs_input_grad[4] else None,) + (None,) * (len(kids) - 1)
        N, _, H, W = dz.shape
        cout = weight.shape[0]
        w2 = weight.reshape(cout, -1)
        g = _pixels(dz.to(weight.dtype))  # [M, Cout]
        need_w = ctx.needs_input_grad[3]
        dkids, dw_blocks = [], []
        k0 = 0
        for i, c in enumerate(kids):
            ci = c.shape[1]
            wi = w2[:, k0:k0 + ci]
            if not ctx.needs_input_grad[4 + i]:
                dkids.append(None)
            elif i == 0 and dshare is not None:
                dkids.append(dgrad_onto(impl, dz, c, wi.view(cout, ci, 1, 1), dshare, False)[0])
            else:
                dkids.append((g @ wi).view(N, H, W, ci).permute(0, 3, 1, 2))
            if need_w:
                dw_blocks.append(g.t() @ _pixels(c).to(g.dtype))
            k0 += ci
        dw = None
        if need_w:
            dw = torch.cat(dw_blocks, 1)  # [Cout, Cin] row-major: the memory of any dense 1x1 weight
            # With the weight's own strides (a channels_last 1x1 weight has the same bytes, other strides), so that
            # the gradient keeps the parameter's layout and DDP's buckets take it without a copy.
            dw = dw.as_strided(weight.shape, weight.stride()) if weight.stride()[:2] == dw.stride() \
                else dw.view_as(weight)
        return (None, None, None, dw, *dkids)


class MaxPool(torch.autograd.Function):
    """y = max_pool2d(x, k, stride=k) (no padding, floor mode: the trees' downsampling) on the Triton kernels.
    The forward stores no indices (the inference kernel); the backward finds each window's winner again from x,
    which the model keeps anyway (the previous layer's output), and writes every input's gradient in one pass
    where ATen zero-fills the input gradient and then scatters into it. forward(x, k, share=False); ``share``:
    x comes back as a second output, whose gradient (x's other readers') that pass adds as it writes (as
    :class:`ConvStats`' ``share``)."""

    @staticmethod
    def forward(ctx, x, k, share=False):
        from ..backends.triton import _launch
        ctx.k, ctx.share = int(k), bool(share)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        y = _launch.max_pool_launch(x, int(k), raw=True)
        return (y, x) if share else y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *rest):
        from ..backends.triton import _train as kt
        (x,) = ctx.saved_tensors
        dshare = rest[0] if ctx.share else None
        if dy is None:
            return dshare, None, None
        return kt.max_pool_backward_launch(x, dy, ctx.k, raw=True, extra=dshare), None, None


def _pixels_ok(t: torch.Tensor) -> bool:
    """Whether t's (n, h, w) collapse to one row index with channels at unit stride (read in place)."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    return (c == 1 or sc == 1) and (h == 1 or sh == w * sw) and (n == 1 or sn == h * w * sw)
