"""Write dla_fast/ops/auto_table.json (the measured per-shape choices of backend="auto") from opbench runs.

    python benchmarks/make_auto_table.py benchmarks/results/<run1>.json [<run2>.json ...] \
        [-o dla_fast/ops/auto_table.json] [--margin 0.05]

Every input must come from one card (the table records its compute capability and only applies there).
Runs at different batch sizes give separate entries (auto takes the one measured nearest the actual batch).
Later files override earlier ones for the same (shape, dtype, implementation, batch): a re-measurement of a
few shapes after a kernel change replaces the old rows and keeps the rest. Layers sharing a key (same weight
shape, stride, padding, groups, dtype and input size, with and without a residual) are decided by their
count-weighted total time. A shape gets the fastest of triton / cuda / eager only if that beats what auto
would run without the table (the fixed rules in dla_fast/ops/_backends.py) by more than ``--margin``:
timing noise must not flip choices back and forth between runs.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
from typing import Dict, List

_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_here))

from dla_fast.ops import _backends  # noqa: E402

IMPLS = ("triton", "cuda", "eager")
REL_ERR_FLAG = 5e-2  # as in opbench.py: a fast wrong result never wins
DEFAULT_OUT = os.path.join(os.path.dirname(_here), "dla_fast", "ops", "auto_table.json")


def key_of(shape: Dict, dtype: str) -> tuple:
    import torch
    dt = getattr(torch, dtype)
    if shape["op"] == "aggregate":
        return _backends.aggregate_key(shape["cin"], shape["cout"], dt, shape["hw"])
    return _backends.conv_key(shape["weight_shape"], shape["stride"], shape["padding"], shape["groups"], dt,
                              shape["hw"])


def default_choice(key, available) -> str:
    """What backend="auto" runs for ``key`` without a table (the fixed rules, then DEFAULT_ORDER)."""
    for name in _backends.auto_preference(key, None) + _backends.DEFAULT_ORDER:
        if name in available:
            return name
    return "eager"


def build(paths: List[str], margin: float, mixed_cards: bool = False) -> Dict:
    runs = [json.load(open(p)) for p in paths]
    caps = {str(r.get("capability")) for r in runs}
    devices = sorted({r.get("device") for r in runs})
    if len(caps) != 1 or (len(devices) != 1 and not mixed_cards):
        raise SystemExit(f"the runs come from different cards ({devices}, capability {caps}); build one table per "
                         "card (--mixed-cards accepts cards of one compute capability, e.g. H100 and H200)")
    shapes: Dict[str, Dict] = {}
    ms: Dict[tuple, float] = {}
    for r in runs:
        for s in r["shapes"]:
            shapes[s["id"]] = s
        for row in r["rows"]:
            if row["impl"] in IMPLS and row.get("ms") is not None and (row.get("rel_err") is None or row["rel_err"] <= REL_ERR_FLAG):
                batch = int(row.get("batch") or r.get("batch") or 0) or None
                ms[(row["shape_id"], row["dtype"], row["impl"], batch)] = float(row["ms"])
    per_key: Dict[tuple, Dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    have: Dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    labels: Dict[tuple, List[str]] = collections.defaultdict(list)
    for (sid, dtype, impl, batch), t in ms.items():
        s = shapes[sid]
        k = (key_of(s["shape"], dtype), batch)
        per_key[k][impl] += t * s["count"]
        have[k][impl] += 1
        if s["label"] not in labels[k]:
            labels[k].append(s["label"])
    entries = []
    for (k, batch), times in sorted(per_key.items(), key=lambda kv: repr(kv[0])):
        # Only implementations measured on every shape of the key are comparable.
        n = max(have[(k, batch)].values())
        times = {i: t for i, t in times.items() if have[(k, batch)][i] == n}
        if not times:
            continue
        best = min(times, key=times.get)
        dflt = default_choice(k, times)
        choice = best if (dflt not in times or times[best] < (1.0 - margin) * times[dflt]) else dflt
        entries.append({"key": list(_listify(k)), "batch": batch, "backend": choice, "default": dflt,
                        "ms_weighted": {i: round(t, 4) for i, t in sorted(times.items())},
                        "shapes": labels[(k, batch)]})
    r0 = runs[-1]
    cap = [int(v) for v in str(r0["capability"]).split(".")]
    batches = sorted({e["batch"] for e in entries if e["batch"] is not None})
    return {"device": " + ".join(devices), "capability": cap, "batch": batches, "hw": r0.get("hw"),
            "torch": r0.get("torch"), "triton": r0.get("triton"), "cudnn": r0.get("cudnn"),
            "margin": margin, "sources": [os.path.basename(p) for p in paths],
            "generated": datetime.date.today().isoformat(), "entries": entries}


def _listify(v):
    return [_listify(x) for x in v] if isinstance(v, (tuple, list)) else v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="opbench --json files, oldest first")
    ap.add_argument("-o", "--out", default=DEFAULT_OUT)
    ap.add_argument("--margin", type=float, default=0.05)
    ap.add_argument("--mixed-cards", action="store_true",
                    help="accept runs from different cards of one compute capability (the table names them all)")
    a = ap.parse_args(argv)
    table = build(a.runs, a.margin, a.mixed_cards)
    with open(a.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    c = collections.Counter((e["batch"], e["key"][-2], e["backend"]) for e in table["entries"])
    changed = sum(e["backend"] != e["default"] for e in table["entries"])
    print(f"wrote {a.out}: {len(table['entries'])} entries, {changed} differ from the default order; "
          + ", ".join(f"bs{bt} {dt} {b}: {n}" for (bt, dt, b), n in sorted(c.items(), key=repr)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
