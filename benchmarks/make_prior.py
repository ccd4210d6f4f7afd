"""Write the prior of ``backend="auto"`` for one compute capability from committed tuning runs.

    python benchmarks/make_prior.py benchmarks/results/h100-tune-*.json [-o dla_fast/plan/prior/sm90.json]

A tuning run is the JSON that ``python -m dla_fast tune ... --json`` writes: the device, versions, and per
layer call the measured candidates and the winner. The prior keeps only the calls whose winner differs from
what the rule (``dla_fast.plan.planner.rule``, every backend available) would run, so it is small and says
exactly where measurement beats the rule. Every run must come from GPUs of one compute capability; later runs
override earlier ones for the same call.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Dict, List

_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_here))

from dla_fast.plan.planner import LayerKey, Plan, rule  # noqa: E402

ALL_AVAILABLE = {"eager": True, "triton": True, "cuda": True}


def build(runs: List[dict]) -> dict:
    caps = {tuple(r["capability"]) for r in runs}
    if len(caps) != 1:
        raise SystemExit(f"the runs come from GPUs of different compute capability ({sorted(caps)}); build one prior "
                         "per capability")
    plans: Dict[str, dict] = {}
    for r in runs:
        for text, entry in r["plans"].items():
            plans[text] = entry
    entries = {}
    for text, entry in sorted(plans.items()):
        key = LayerKey.parse(text)
        plan = Plan.from_json(entry, "prior")
        base = rule(key, ALL_AVAILABLE)
        if (plan.backend, plan.config) != (base.backend, base.config):
            entries[text] = plan.to_json()
    first = runs[-1]
    return {
        "capability": list(caps.pop()),
        "device": sorted({r["device"] for r in runs}),
        "versions": {k: first.get(k) for k in ("torch", "triton", "cuda", "dla_fast")},
        "date": datetime.date.today().isoformat(),
        "sources": [r.get("source", "?") for r in runs],
        "measured_calls": len(plans),
        "entries": entries,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="tuning runs (python -m dla_fast tune ... --json), oldest first")
    p.add_argument("-o", "--out", default=None, help="default: dla_fast/plan/prior/sm<major><minor>.json")
    a = p.parse_args(argv)
    runs = []
    for path in a.runs:
        with open(path) as f:
            r = json.load(f)
        r["source"] = os.path.basename(path)
        runs.append(r)
    prior = build(runs)
    cap = prior["capability"]
    out = a.out or os.path.join(os.path.dirname(_here), "dla_fast", "plan", "prior", f"sm{cap[0]}{cap[1]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(prior, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {out}: {len(prior['entries'])} of {prior['measured_calls']} measured calls differ from the rule")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
