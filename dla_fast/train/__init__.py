"""The training path: fused conv + BatchNorm (batch statistics) + ReLU and the concat-free aggregation node,
forward and backward.

Layered like the inference path: modules (:mod:`.modules`) -> functional ops with validation and their eager
reference (:mod:`.ops`) -> autograd functions (:mod:`._autograd`) -> Triton kernels
(:mod:`dla_fast.backends.triton._train`); :class:`.graph.CapturedTrainStep` replays a whole step's forward and
backward from a CUDA graph. Importing this package does not import Triton.
"""
from .graph import CapturedTrainStep
from .modules import TrainAggregate, TrainConvBnAct
from .ops import (aggregate_bn_relu_train, aggregate_bn_relu_train_ref, conv_bn_relu_train, conv_bn_relu_train_ref,
                  fused_unavailable_reason)

__all__ = ["CapturedTrainStep", "TrainConvBnAct", "TrainAggregate", "conv_bn_relu_train", "conv_bn_relu_train_ref",
           "aggregate_bn_relu_train", "aggregate_bn_relu_train_ref", "fused_unavailable_reason"]
