"""The fused training forward of a DLA, stage by stage (``DLA.set_fused_training``).

It walks the model's own modules (stem, conv levels, trees, blocks, aggregation nodes) and runs each conv + BN
(+ residual) + ReLU group through :func:`.modules.conv_bn_act` and each aggregation node through
:func:`.modules.aggregate`, with the modules' own parameters and buffers: the optimizer, the state_dict and the
BN running statistics are the model's. It computes what the modules' forwards compute (``dla_fast.models.dla``),
so a structure it does not know is an error, never a silent difference.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .modules import aggregate, conv_bn_act

__all__ = ["stage"]


def _conv_level(seq: nn.Sequential, x: torch.Tensor, backend: str) -> torch.Tensor:
    """The stem or a conv level: (Conv2d, BatchNorm2d, ReLU) triples."""
    mods = list(seq)
    if len(mods) % 3 or not all(isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and isinstance(r, nn.ReLU)
                                for c, b, r in zip(mods[0::3], mods[1::3], mods[2::3])):
        raise TypeError(f"fused training expects a conv level of (Conv2d, BatchNorm2d, ReLU) triples, got "
                        f"{[type(m).__name__ for m in mods]}")
    for i in range(0, len(mods), 3):
        x = conv_bn_act(mods[i], mods[i + 1], x, None, True, backend)
    return x


def defer_mode(save_memory: bool):
    """What the blocks' first convs hand on (``defer`` of :func:`.modules.conv_bn_act`): False, the activation
    itself; with ``save_memory``, a :class:`.ops.Deferred` the next conv takes in its prologue, or with
    DLA_FAST_TRAIN_SAVE_MEMORY=recompute forms in a pass of its own and drops after it."""
    if not save_memory:
        return False
    from .. import _env
    mode = _env.choice("DLA_FAST_TRAIN_SAVE_MEMORY") or "prologue"
    return True if mode == "prologue" else mode


def _block(b: nn.Module, x: torch.Tensor, shortcut: Optional[torch.Tensor], backend: str,
           defer=False, shared: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the block's output, x2): x2 is x as x's later readers take it, shared by the block's first conv and
    by its last BN where x is the residual (``share`` / ``share_residual`` of :func:`.modules.conv_bn_act`:
    their gradients join x's in the kernels of those backwards). ``shared``: ``[shortcut]`` where the shortcut
    has later readers too; the last BN shares it and leaves in it the shortcut as they take it."""
    from ..models.dla import DlaBasic, DlaBottle2neck, DlaBottleneck

    own = shortcut is None or shortcut is x

    def last(conv, bn, y, x2):
        if own:
            return conv_bn_act(conv, bn, y, x2, True, backend, share_residual=True)
        if shared is not None:
            out, shared[0] = conv_bn_act(conv, bn, y, shortcut, True, backend, share_residual=True)
            return out, x2
        return conv_bn_act(conv, bn, y, shortcut, True, backend), x2

    # Inside a block each conv's activation feeds the next conv alone: deferred (save_memory), it is not kept
    # for the backward, which recomputes it.
    if isinstance(b, DlaBasic):
        y, x2 = conv_bn_act(b.conv1, b.bn1, x, None, True, backend, defer, share=True)
        return last(b.conv2, b.bn2, y, x2)
    if isinstance(b, DlaBottleneck):
        y, x2 = conv_bn_act(b.conv1, b.bn1, x, None, True, backend, defer, share=True)
        y = conv_bn_act(b.conv2, b.bn2, y, None, True, backend, defer)
        return last(b.conv3, b.bn3, y, x2)
    if isinstance(b, DlaBottle2neck):
        y, x2 = conv_bn_act(b.conv1, b.bn1, x, None, True, backend, share=True)
        pieces = torch.split(y, b.width, 1)
        outs: List[torch.Tensor] = []
        sp = pieces[0]
        for i, (conv, bn) in enumerate(zip(b.convs, b.bns)):
            sp = pieces[i] if (i == 0 or b.is_first) else sp + pieces[i]
            sp = conv_bn_act(conv, bn, sp, None, True, backend)
            outs.append(sp)
        if b.scale > 1:
            outs.append(b.pool(pieces[-1]) if b.pool is not None else pieces[-1])
        return last(b.conv3, b.bn3, torch.cat(outs, 1), x2)
    raise TypeError(f"fused training does not know the block {type(b).__name__}")


def _node(m: nn.Module, x: torch.Tensor, shortcut: Optional[torch.Tensor], children: Optional[List[torch.Tensor]],
          backend: str, defer=False, shared: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the node's output, x as its later readers take it): see :func:`_block` (``shared``: blocks only; a tree
    makes its own shortcut)."""
    from ..models.dla import DlaTree

    if isinstance(m, DlaTree):
        return _tree(m, x, shortcut, children, backend, defer)
    return _block(m, x, shortcut, backend, defer, shared)


def _pool_size(pool: nn.Module) -> Optional[int]:
    """K for a plain K x K max pool of stride K (no padding, dilation, ceil mode or indices), else None."""
    if not isinstance(pool, nn.MaxPool2d) or pool.ceil_mode or pool.return_indices:
        return None
    k, s, p, d = (nn.modules.utils._pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    if k != s or k[0] != k[1] or p != (0, 0) or d != (1, 1):
        return None
    return int(k[0])


def _pool_kernel(pool: nn.Module, x: torch.Tensor, backend: str) -> Optional[int]:
    """K where a tree's downsampling of x runs on the Triton max-pool (as for the convs: CUDA fp16/bf16 under auto;
    the interpreter only when asked for by name), else None: the module runs. Traced code (torch.compile) keeps
    the module, which Inductor fuses itself."""
    from . import _autograd as ag
    from .ops import kernels_unavailable_reason

    k = _pool_size(pool)
    if (k is None or backend == "eager" or not ag._direct(x) or x.dim() != 4
            or kernels_unavailable_reason(x, backend, x.dtype) is not None):
        return None
    return k


def _tree(t: nn.Module, x: torch.Tensor, shortcut: Optional[torch.Tensor], children: Optional[List[torch.Tensor]],
          backend: str, defer=False, pooled: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the tree's output, x as its later readers take it): see :func:`_block`. ``children`` (the aggregation
    node's extra inputs handed down) is updated in place where one of them is x. Where the pools run on the
    kernels, each input is pooled once: ``pooled`` is ``[x downsampled]`` by an outer tree with this tree's
    window, used instead of pooling x again, and the tree leaves in it the map as the outer tree's later readers
    take it; a tree that reads no downsampled input (:meth:`DlaTree.pools`) and gets none pools nothing (tree1
    makes its own). Where the modules run, every tree pools, as the modules do (the same numbers, bit for bit)."""
    if children is None:
        children = []
    # Each reader of a tensor with several hands the later ones what it shares (the pool, the projection,
    # tree1's first conv): their gradients join in its backward's kernel. The aggregation node, last, reads
    # whatever stands in `children` by then.
    from . import _autograd as ag

    bottom: Optional[torch.Tensor] = None
    x_in = x
    k = _pool_kernel(t.downsample, x, backend)
    once = k is not None
    if pooled is not None:
        bottom = pooled[0]
    elif not once:
        bottom = t.downsample(x)
    elif t.pools():
        # the Triton max-pool (forward and backward, no indices) shares x: its backward adds the later readers'
        # gradient as it writes x's
        bottom, x_in = ag.MaxPool.apply(x, k, True)
        _swap(children, x, x_in)
    if bottom is not None and not isinstance(t.project, nn.Identity):
        shortcut, bottom2 = conv_bn_act(t.project[0], t.project[1], bottom, None, False, backend, share=True)
        _swap(children, bottom, bottom2)
        bottom = bottom2
    else:
        shortcut = bottom  # a tree1 that is a tree makes its own; a block tree1 takes the map as its residual
    if t.level_root:
        children.append(bottom)
    if once and bottom is not None and t.pools_like_tree1():
        down = [bottom]
        x1, x_last = _tree(t.tree1, x_in, None, None, backend, defer, pooled=down)
        _swap(children, bottom, down[0])
        bottom = down[0]
    else:
        # The map itself as a block's residual, with later readers (the root here, or an outer tree's): shared.
        later = once and shortcut is not None and shortcut is bottom and (t.level_root or pooled is not None)
        box = [shortcut] if later else None
        x1, x_last = _node(t.tree1, x_in, shortcut, None, backend, defer, box)
        if box is not None:
            _swap(children, bottom, box[0])
            bottom = box[0]
    if pooled is not None:
        pooled[0] = bottom
    _swap(children, x_in, x_last)
    if t.root is not None:
        x2, x1 = _node(t.tree2, x1, None, None, backend, defer)
        r = t.root
        return aggregate(r.conv, r.bn, [x2, x1] + children, bool(r.shortcut), True, backend), x_last
    children.append(x1)
    return _node(t.tree2, x1, None, children, backend, defer)[0], x_last


def _swap(children: List[torch.Tensor], old: torch.Tensor, new: torch.Tensor) -> None:
    """``children`` reads ``new`` where it read ``old`` (the same tensor, shared by a later reader)."""
    if new is not old:
        children[:] = [new if c is old else c for c in children]


def stage(m: nn.Module, x: torch.Tensor, backend: str = "auto", save_memory: bool = False) -> torch.Tensor:
    """``m(x)`` for a stage of a DLA (``base_layer``, ``level0`` .. ``level5``) on the fused training path;
    ``save_memory``: the blocks' inner activations are not kept for the backward (see :func:`defer_mode`)."""
    from ..models.dla import DlaTree

    if isinstance(m, nn.Identity):
        return x
    if isinstance(m, DlaTree):
        return _tree(m, x, None, None, backend, defer_mode(save_memory))[0]
    if isinstance(m, nn.Sequential):
        return _conv_level(m, x, backend)
    raise TypeError(f"fused training does not know the stage {type(m).__name__}")
