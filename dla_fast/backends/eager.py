"""The eager backend: the fused ops computed by PyTorch (cuDNN/ATen) with the folded weights.

It runs wherever PyTorch runs, so it is the fallback of ``backend="auto"``, and its functions are the
reference the kernel tests compare against (:mod:`dla_fast.ops.reference`). It has one configuration.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..ops.reference import aggregate_ref, conv_bn_act_ref

NAME = "eager"


def unavailable_reason(x: torch.Tensor) -> Optional[str]:
    return None


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                padding: Tuple[int, int], groups: int, residual: Optional[torch.Tensor], relu: bool,
                config: Tuple[int, ...] = ()) -> torch.Tensor:
    return conv_bn_act_ref(x, weight, bias, stride, padding, groups, residual, relu)


def aggregate(children: Sequence[torch.Tensor], weight2d: torch.Tensor, bias: Optional[torch.Tensor],
              residual: Optional[torch.Tensor], relu: bool, config: Tuple[int, ...] = ()) -> torch.Tensor:
    return aggregate_ref(children, weight2d, bias, residual, relu)


def max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x, k, k)


def conv_candidates(x, weight, bias, stride, padding, groups, residual) -> List[Tuple[int, ...]]:
    return [()]


def aggregate_candidates(children, weight2d, bias, residual) -> List[Tuple[int, ...]]:
    return [()]


def describe(config: Tuple[int, ...], op: str = "conv_bn_act") -> str:
    return "cuDNN/ATen"
