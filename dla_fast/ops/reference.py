"""Eager PyTorch implementations of the fused ops.

They are both the fallback (CPU, training, autograd, dtypes a kernel lacks) and the oracle the kernel tests
compare against. They compute exactly the documented function, in the input dtype, through cuDNN/ATen.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def conv_bn_act_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    groups: int,
    residual: Optional[torch.Tensor],
    relu: bool,
) -> torch.Tensor:
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv2d(x, weight.to(x.dtype), b, stride=stride, padding=padding, groups=groups)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y


def aggregate_ref(
    children: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    relu: bool,
) -> torch.Tensor:
    x = torch.cat(list(children), dim=1)
    w = weight.to(x.dtype)
    if w.dim() == 2:
        w = w[:, :, None, None]
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv2d(x, w, b)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y


def front_ref(
    x: torch.Tensor,
    w0: torch.Tensor,
    b0: Optional[torch.Tensor],
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
) -> torch.Tensor:
    """A DLA's stem, level 0 and level 1 (each conv + bias + ReLU): 7x7 pad 3, 3x3 pad 1, 3x3 stride 2 pad 1."""
    y = conv_bn_act_ref(x, w0, b0, (1, 1), (3, 3), 1, None, True)
    y = conv_bn_act_ref(y, w1, b1, (1, 1), (1, 1), 1, None, True)
    return conv_bn_act_ref(y, w2, b2, (2, 2), (1, 1), 1, None, True)
