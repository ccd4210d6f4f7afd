"""The measured per-layer-shape backend table behind ``backend="auto"``.

``auto_table.json`` (next to this file) is written by ``benchmarks/make_auto_table.py`` from a committed
``benchmarks/opbench.py`` run: for every distinct layer shape of the 12 variants and each dtype it names the
fastest of the Triton kernels, the CUDA kernels and the eager path (cuDNN with the folded bias), where that
winner beat the default order by a margin. Shapes are keyed with their input's spatial size at the size they
were measured (224x224 inputs), so a layer at another resolution falls back to the default order.

Each entry also names the batch size it was measured at (256 and 1): a lookup takes the entry measured
nearest to the actual batch (on a log scale), since a 7x7 layer that fills the GPU at batch 256 is a
handful of tiles at batch 1 and the winners differ.

The table only applies on a GPU of the compute capability it was measured on (an H100's choices say little
about an A100). ``DLA_FAST_AUTO_TABLE=/path/to/table.json`` uses another table, ``DLA_FAST_AUTO_TABLE=off``
none.
"""
from __future__ import annotations

import json
import os
import math
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
            default_batch = raw.get("batch") if isinstance(raw.get("batch"), int) else None
            entries: Dict[Tuple, Dict[Optional[int], str]] = {}
            for e in raw.get("entries", []):
                entries.setdefault(_tuplify(e["key"]), {})[e.get("batch", default_batch)] = e["backend"]
            _table = {"capability": tuple(raw.get("capability") or ()) or None, "entries": entries}
    return _table


def reload() -> None:
    """Forget the loaded table (tests and benchmarks switch DLA_FAST_AUTO_TABLE)."""
    global _table
    _table = None
    _cap_ok.clear()


def entries() -> Dict[Tuple, Dict[Optional[int], str]]:
    """key -> {batch size it was measured at: backend}."""
    return {k: dict(v) for k, v in _load()["entries"].items()}


def batches(key) -> Tuple[int, ...]:
    """The batch sizes ``key`` was measured at (ascending; empty if the table has no entry for it)."""
    if key is None or key[-1] is None:
        return ()
    return tuple(sorted(b for b in _load()["entries"].get(key, {}) if b is not None))


def _nearest(by_batch: Dict[Optional[int], str], batch: Optional[int]) -> str:
    known = [b for b in by_batch if b is not None]
    if not known:
        return next(iter(by_batch.values()))
    if batch is None or batch < 1:  # unknown: the throughput regime
        return by_batch[max(known)]
    # Ties go to the smaller size, matching batch_bounds().
    return by_batch[min(known, key=lambda b: (abs(math.log2(b) - math.log2(batch)), b))]


def lookup(key, device: Optional[torch.device] = None, batch: Optional[int] = None) -> Optional[str]:
    """The measured winner for ``key`` on ``device`` at the measured batch size nearest ``batch``, or None."""
    if key is None or key[-1] is None:
        return None
    t = _load()
    if not t["entries"] or device is None or device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok = _cap_ok.get(idx)
    if ok is None:
        ok = _cap_ok[idx] = tuple(torch.cuda.get_device_capability(idx)) == t["capability"]
    if not ok:
        return None
    by_batch = t["entries"].get(key)
    return _nearest(by_batch, batch) if by_batch else None


def batch_bounds(sizes: Tuple[int, ...]) -> Tuple[float, ...]:
    """Upper batch-size bounds of the ranges that map to each of ``sizes`` (ascending) under lookup():
    the geometric midpoints, then infinity."""
    return tuple(math.sqrt(a * b) for a, b in zip(sizes, sizes[1:])) + (math.inf,)
