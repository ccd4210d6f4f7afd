"""Reading checkpoints (timm / Hugging Face files, timm's hub) into our models."""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional

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
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file {path!r} is empty (0 bytes): an interrupted download or save? "
                              f"Fetch or write it again")
    if path.lower().endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors is in the test extras
            raise ImportError("reading .safetensors needs the 'safetensors' package: pip install safetensors") from e
        try:
            sd = load_file(path, device="cpu")
        except Exception as e:
            raise CheckpointError(f"could not read safetensors file {path!r}: {_cause(e)}") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"could not read checkpoint {path!r} (is it a PyTorch .pth/.pt file?): "
                                  f"{_cause(e)}") from e
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


def _cause(e: BaseException) -> str:
    """An exception as ``Type: message``; some readers raise with an empty message (e.g. a bare EOFError)."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg}" if msg else f"{type(e).__name__} (no message)"


def adapt_first_conv(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Turn an RGB stem weight into one for ``in_chans`` inputs, preserving the response to grey input."""
    if w.shape[1] == in_chans:
        return w
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = -(-in_chans // w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)


CLASSIFIER_MODES = ("match", "adapt", "ignore")


def _list(items: List[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _unloadable(k: str, v, target: torch.Tensor) -> Optional[str]:
    """Why tensor ``v`` cannot be copied into ``target`` (None if it can)."""
    if not isinstance(v, torch.Tensor):
        return f"{k}: a {type(v).__name__}, not a tensor"
    if v.layout != torch.strided:
        return f"{k}: a {v.layout} tensor (only dense tensors can be loaded; call .to_dense() on it)"
    if v.is_meta:
        return f"{k}: a meta tensor (it has a shape but no data)"
    if v.is_quantized or v.is_complex() or v.dtype == torch.bool:
        return f"{k}: dtype {v.dtype}"
    if target.is_floating_point() and not v.is_floating_point():
        return f"{k}: dtype {v.dtype} where the model has a floating-point {target.dtype}"
    if not target.is_floating_point() and v.is_floating_point():
        return f"{k}: dtype {v.dtype} where the model has an integer {target.dtype}"
    return None


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], strict: bool = True,
              source: str = "checkpoint", classifier: str = "match") -> None:
    """Load ``sd`` into ``model`` all at once or not at all.

    Everything is checked before anything is written: tensor kinds (dense, not meta, floating-point where the
    model has floats), shapes, and with ``strict`` missing and unexpected keys (``*.num_batches_tracked`` may be
    missing, as torch allows: those counters keep their values). Any problem is a ``CheckpointError`` listing
    the keys, and nothing is loaded. The stem is adapted for another ``in_chans``, as timm does.

    The classifier (``fc.weight``, ``fc.bias``) is loaded whole or not at all, per ``classifier``:
    ``"match"`` (the model has the checkpoint's number of classes): a classifier that does not fit is an error,
    or with ``strict=False`` a warning naming its keys; ``"adapt"`` (the model was built for another
    ``num_classes``, timm's case of dropping the pretrained head): one that does not fit is dropped with a
    warning naming its keys; ``"ignore"`` (a features_only model): the checkpoint's classifier is not used.
    """
    if classifier not in CLASSIFIER_MODES:
        raise ValueError(f"classifier must be one of {CLASSIFIER_MODES}, got {classifier!r}")
    sd = dict(sd)
    own = model.state_dict()
    arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    problems: List[str] = []

    head_sd = [k for k in CLASSIFIER_KEYS if k in sd]
    head_own = [k for k in CLASSIFIER_KEYS if k in own]
    head_fits = classifier != "ignore" and bool(head_sd) and head_sd == head_own and all(
        isinstance(sd[k], torch.Tensor) and sd[k].shape == own[k].shape for k in head_sd)
    if head_sd and not head_fits and classifier != "ignore":
        theirs = ", ".join(f"{k} {_shape_of(sd[k])}" for k in head_sd)
        ours = ", ".join(f"{k} {tuple(own[k].shape)}" for k in head_own) or "none (num_classes=0)"
        n_theirs = _num_classes_of(sd)
        n_ours = getattr(model, "num_classes", None)
        if classifier == "adapt":
            fate = f" ({ours}), which keeps its fresh initialisation" if head_own else ""
            warnings.warn(f"{source}: its classifier ({theirs}) is not loaded: the model was built with "
                          f"num_classes={n_ours}{fate}", UserWarning, stacklevel=3)
        elif strict:
            hint = (f"pass num_classes={n_theirs} to load it, " if n_theirs not in (None, n_ours) else "")
            problems.append(f"the classifier does not fit: checkpoint {theirs} vs model {ours} ({hint}"
                            f"pass num_classes=N != 1000 to start a new head, or strict=False to keep the "
                            f"model's fresh head)")
        else:
            warnings.warn(f"{source}: its classifier ({theirs}) does not fit the model's ({ours}) and is not "
                          f"loaded (strict=False); the head keeps its fresh initialisation", UserWarning,
                          stacklevel=3)
    if not head_fits and (head_sd or classifier != "match"):
        # Whole or nothing: a head we do not fill keeps its fresh init (and is not reported missing).
        for k in head_sd:
            sd.pop(k)
        for k in head_own:
            own.pop(k)

    bad = [why for k, v in sd.items() if k in own for why in [_unloadable(k, v, own[k])] if why]
    if bad:
        raise CheckpointError(f"{source} has tensors that cannot be loaded into {arch}; nothing was loaded: "
                              + _list(bad, 6))
    first = "base_layer.0.weight"
    if first in sd and first in own and sd[first].shape != own[first].shape and sd[first].dim() == 4:
        sd[first] = adapt_first_conv(sd[first], own[first].shape[1])
    # torch's own strict load accepts a state_dict without the BN batch counters; so do we.
    missing = [k for k in own if k not in sd and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if shapes:
        problems.append(f"shape mismatches: {_list(shapes, 6)}")
    if strict and missing:
        problems.append(f"missing keys: {_list(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if problems:
        hint = (". Is it a checkpoint of another variant? (strict=False ignores missing/unexpected keys only.)"
                if shapes or (strict and (missing or unexpected)) else ".")
        raise CheckpointError(f"{source} does not fit {arch}; nothing was loaded. " + "; ".join(problems) + hint)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def _shape_of(v) -> str:
    return str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__


def _num_classes_of(sd: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The checkpoint classifier's number of classes, if its tensors agree on one."""
    sizes = {int(v.shape[0]) for k in CLASSIFIER_KEYS for v in [sd.get(k)]
             if isinstance(v, torch.Tensor) and v.dim() >= 1}
    return sizes.pop() if len(sizes) == 1 else None


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
