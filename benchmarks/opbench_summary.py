"""One-screen summary of an opbench run (``benchmarks/opbench.py --json``): how many (shape, dtype) rows the CUDA
backend wins against the eager conv+BN(+add)+ReLU sequence, geomean ratios against Triton and against an earlier
run, and every losing row.

    python benchmarks/opbench_summary.py RUN.json [--ref EARLIER.json] [--impl cuda] [--show REGEX]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Dict, Optional, Sequence, Tuple

Key = Tuple[str, str]


def times(path: str, impl: str) -> Dict[Key, float]:
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {(r["shape_id"], r["dtype"]): r["ms"] for r in rows if r["impl"] == impl and r.get("ms")}


def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="opbench JSON with the impl and eager_seq rows")
    p.add_argument("--ref", default=None, help="an earlier opbench JSON: geomean speed of this run against it")
    p.add_argument("--impl", default="cuda", help="the implementation to summarise (default cuda)")
    p.add_argument("--show", default=None, help="also print the rows whose shape id matches this regex")
    a = p.parse_args(argv)
    ours, eager, triton = times(a.run, a.impl), times(a.run, "eager_seq"), times(a.run, "triton")
    if not ours or not eager:
        print(f"{a.run}: needs '{a.impl}' and 'eager_seq' rows", file=sys.stderr)
        return 2
    both = [k for k in ours if k in eager]
    lose = sorted(k for k in both if ours[k] > eager[k])
    print(f"{a.impl}: {len(both) - len(lose)} of {len(both)} rows beat eager_seq; geomean eager_seq/{a.impl} "
          f"{geomean([eager[k] / ours[k] for k in both]):.3f}")
    if triton:
        tk = [k for k in ours if k in triton]
        print(f"geomean triton/{a.impl} {geomean([triton[k] / ours[k] for k in tk]):.3f}; triton faster on "
              f"{sum(triton[k] < ours[k] for k in tk)} of {len(tk)}")
    if a.ref:
        ref = times(a.ref, a.impl)
        rk = [k for k in ours if k in ref]
        print(f"geomean ref/{a.impl} {geomean([ref[k] / ours[k] for k in rk]):.3f} over {len(rk)} rows")
    for k in lose:
        print(f"LOSE {k[0]} {k[1]}: {ours[k]:.4f} ms, eager_seq {eager[k]:.4f} ({eager[k] / ours[k]:.3f}x)")
    if a.show:
        pat = re.compile(a.show)
        for k in sorted(k for k in both if pat.search(k[0])):
            print(f"     {k[0]} {k[1]}: {ours[k]:.4f} ms, eager_seq {eager[k]:.4f} ({eager[k] / ours[k]:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
