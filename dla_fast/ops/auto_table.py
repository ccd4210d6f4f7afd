"""The measured per-layer-shape backend table behind ``backend="auto"``.

``auto_table.json`` (next to this file) is written by ``benchmarks/make_auto_table.py`` from a committed
``benchmarks/opbench.py`` run: for every distinct layer shape of the 12 variants and each dtype it names the
fastest of the Triton kernels, the CUDA kernels and the eager path (cuDNN with the folded bias), where that
winner beat the default order by a margin. Shapes are keyed with their input's spatial size at the size they
were measured (224x224 inputs, batch 256), so a layer at another resolution falls back to the default order.

The table only applies on a GPU of the compute capability it was measured on (an H100's choices say little
about an A100). ``DLA_FAST_AUTO_TABLE=/path/to/table.json`` uses another table, ``DLA_FAST_AUTO_TABLE=off``
none.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")
_table: Optional[Dict] = None
_cap_ok: Dict[int, bool] = {}


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _load() -> Dict:
    global _table
    if _table is None:
        path = os.environ.get("DLA_FAST_AUTO_TABLE", "").strip() or _PATH
        if path.lower() in ("off", "0", "none") or not os.path.isfile(path):
            _table = {"capability": None, "entries": {}}
        else:
            with open(path) as f:
                raw = json.load(f)
            _table = {"capability": tuple(raw.get("capability") or ()) or None,
                      "entries": {_tuplify(e["key"]): e["backend"] for e in raw.get("entries", [])}}
    return _table


def reload() -> None:
    """Forget the loaded table (tests and benchmarks switch DLA_FAST_AUTO_TABLE)."""
    global _table
    _table = None
    _cap_ok.clear()


def entries() -> Dict[Tuple, str]:
    return dict(_load()["entries"])


def lookup(key, device: Optional[torch.device] = None) -> Optional[str]:
    """The measured winner for ``key`` on ``device``, or None."""
    if key is None or key[-1] is None:
        return None
    t = _load()
    if not t["entries"] or device is None or device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok = _cap_ok.get(idx)
    if ok is None:
        ok = _cap_ok[idx] = tuple(torch.cuda.get_device_capability(idx)) == t["capability"]
    return t["entries"].get(key) if ok else None
