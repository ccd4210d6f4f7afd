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
