"""Reading checkpoints (timm / Hugging Face files, timm's hub) into our models."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Mapping

import torch
import torch.nn as nn

CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin/.safetensors file, unwrapped from the usual training containers."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors is in the test extras
            raise ImportError("reading .safetensors needs the 'safetensors' package: pip install safetensors") from e
        try:
            sd = load_file(path, device="cpu")
        except Exception as e:
            raise CheckpointError(f"could not read safetensors file {path!r}: {e}") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"could not read checkpoint {path!r} (is it a PyTorch .pth/.pt file?): {e}") from e
    for wrapper in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path!r} does not hold a state_dict (a mapping of names to tensors)")
    out = OrderedDict()
    for k, v in sd.items():
        out[k[7:] if k.startswith("module.") else k] = v
    return out


def adapt_first_conv(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Turn an RGB stem weight into one for ``in_chans`` inputs, preserving the response to grey input."""
    if w.shape[1] == in_chans:
        return w
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = -(-in_chans // w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True,
              source: str = "checkpoint") -> None:
    """Load ``sd`` into ``model`` all at once or not at all.

    The classifier is dropped when its size differs (a checkpoint for another ``num_classes``) and the stem is
    adapted for another ``in_chans``, as timm does. With ``strict`` any other missing, unexpected or
    mis-shaped key is an error listing them; nothing is loaded in that case.
    """
    sd = dict(sd)
    own = model.state_dict()
    first = "base_layer.0.weight"
    if first in sd and first in own and sd[first].shape != own[first].shape and sd[first].dim() == 4:
        sd[first] = adapt_first_conv(sd[first], own[first].shape[1])
    for k in CLASSIFIER_KEYS:
        if k in sd and (k not in own or sd[k].shape != own[k].shape):
            sd.pop(k)
            own.pop(k, None)  # a head we cannot fill keeps its fresh init
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if shapes or (strict and (missing or unexpected)):
        def _list(items, n=12):
            return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")
        parts = []
        if shapes:
            parts.append(f"shape mismatches: {_list(shapes, 6)}")
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise CheckpointError(
            f"{source} does not fit {arch}; nothing was loaded. " + "; ".join(parts) +
            ". Is it a checkpoint of another variant? (strict=False ignores missing/unexpected keys only.)")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def hub_state_dict(name: str) -> Dict[str, torch.Tensor]:
    """timm's pretrained ``timm/<name>.in1k`` weights, through timm (needs timm and the network)."""
    try:
        import timm
    except ImportError as e:
        raise RuntimeError(
            f"pretrained=True fetches timm/{name}.in1k through timm, which is not installed. Either "
            f"`pip install timm` (and be online), or download the weights yourself and pass the file: "
            f"create_model({name!r}, pretrained='/path/to/model.safetensors')") from e
    try:
        ref = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise RuntimeError(
            f"could not fetch pretrained weights timm/{name}.in1k ({type(e).__name__}: {e}). If this machine "
            f"is offline, download the checkpoint elsewhere and pass its path: "
            f"create_model({name!r}, pretrained='/path/to/model.safetensors')") from e
    return ref.state_dict()
