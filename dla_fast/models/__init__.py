"""The DLA model zoo: factory, registry and conversion from timm."""
from __future__ import annotations

import fnmatch
import os
from typing import List, Optional, Sequence, Union

import torch.nn as nn

from ._weights import CheckpointError, hub_state_dict, load_into, read_state_dict
from .dla import (DLA, MODEL_ARGS, DlaBasic, DlaBottle2neck, DlaBottleneck, DlaFeatures, DlaRoot, DlaTree,
                  FeatureInfo, GlobalPool, check_input, default_cfg, feature_take_indices, valid_size)

__all__ = ["create_model", "list_models", "from_timm", "DLA", "DlaFeatures", "CheckpointError",
           "DlaBasic", "DlaBottleneck", "DlaBottle2neck", "DlaRoot", "DlaTree", "GlobalPool", "FeatureInfo",
           "check_input", "feature_take_indices", "valid_size", "MODEL_ARGS"]

PretrainedArg = Union[bool, str, os.PathLike]


def list_models(pattern: str = "*") -> List[str]:
    """Sorted variant names matching a shell-style ``pattern`` (e.g. ``"dla60*"``)."""
    return sorted(n for n in MODEL_ARGS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, pretrained: PretrainedArg = False, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = "avg", features_only: bool = False,
                 out_indices: Optional[Union[int, Sequence[int]]] = None, strict: bool = True,
                 **kwargs) -> nn.Module:
    """Build a DLA variant, with timm's arguments.

    ``pretrained`` is False, True (timm's hub weights, needs timm and the network) or the path of a
    .pth/.pt/.safetensors checkpoint in timm's key layout. ``features_only=True`` returns a module whose
    forward gives the feature maps of ``out_indices`` (default: levels 1..5, as timm; an int ``n`` is the last
    ``n`` levels, negative indices count from the end).
    """
    if name not in MODEL_ARGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if kwargs:
        raise TypeError(f"create_model() got unexpected arguments: {', '.join(sorted(kwargs))}")
    model = DLA(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, global_pool=global_pool,
                **MODEL_ARGS[name])
    model.pretrained_cfg = default_cfg(name)
    model.default_cfg = model.pretrained_cfg
    # As timm: a num_classes other than the pretrained one means a new head, and the checkpoint's is dropped
    # (with a warning); otherwise the checkpoint's classifier must fit. A features_only model has no head.
    classifier = ("ignore" if features_only else
                  "match" if num_classes == model.pretrained_cfg["num_classes"] else "adapt")
    if pretrained is True:
        load_into(model, hub_state_dict(name), strict=strict, source=f"timm/{name}.in1k", classifier=classifier)
    elif pretrained not in (False, None):
        path = os.fspath(pretrained)
        load_into(model, read_state_dict(path), strict=strict, source=f"checkpoint {path!r}",
                  classifier=classifier)
    if features_only:
        return DlaFeatures(model, out_indices)
    if out_indices is not None:
        raise ValueError("out_indices is only meaningful with features_only=True")
    return model


def _arch_of(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture")
    return arch if arch in MODEL_ARGS else None


def _infer_arch(model: nn.Module) -> Optional[str]:
    """The variant whose parameter names and shapes equal the model's (the classifier aside)."""
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}
    in_chans = theirs.get("base_layer.0.weight", (0, 3))[1]
    for name in MODEL_ARGS:
        ours = DLA(num_classes=0, in_chans=in_chans, **MODEL_ARGS[name]).state_dict()
        if {k: tuple(v.shape) for k, v in ours.items()} == theirs:
            return name
    return None


def from_timm(timm_model: nn.Module) -> DLA:
    """Our model with the same architecture, head and weights as a timm DLA classifier.

    The timm model is left untouched; the copy is on the same device/dtype and in the same train/eval mode.
    """
    if type(timm_model).__name__ != "DLA" or not hasattr(timm_model, "level5"):
        raise TypeError(f"from_timm expects a timm DLA classifier (timm.create_model('dla34', ...)), got "
                        f"{type(timm_model).__name__}; features_only timm models are not supported, convert the "
                        "classifier and use create_model(..., features_only=True) semantics instead")
    arch = _arch_of(timm_model) or _infer_arch(timm_model)
    if arch is None:
        raise ValueError("could not tell which DLA variant this timm model is: neither its pretrained_cfg nor "
                         "its parameter shapes match one of " + ", ".join(list_models()))
    pool = getattr(timm_model.global_pool, "pool_type", "avg") or ""
    ours = DLA(num_classes=timm_model.num_classes, in_chans=timm_model.in_chans, global_pool=pool,
               drop_rate=float(getattr(timm_model, "drop_rate", 0.0) or getattr(timm_model.head_drop, "p", 0.0)),
               **MODEL_ARGS[arch])
    ours.pretrained_cfg = default_cfg(arch)
    ours.default_cfg = ours.pretrained_cfg
    ref = next(timm_model.parameters())
    ours.to(device=ref.device, dtype=ref.dtype)
    load_into(ours, timm_model.state_dict(), strict=True, source=f"timm model {arch}")
    ours.train(timm_model.training)
    return ours
