"""A/B of one `python -m dla_fast bench` command: two settings (environment switches, or two trees), each arm its
own process, alternated A1 B1 A2 B2 ... so that drift of the card (clocks, temperature) falls on both.

    python benchmarks/ab.py --a DLA_FAST_TRAIN_WGRAD=aten --b DLA_FAST_TRAIN_WGRAD=triton --rounds 2 \
        --json ab.json -- --train --distributed 1 --model dla34 --batch-size 256 --dtype bfloat16 \
        --impl dla_fast_fused_graph
    python benchmarks/ab.py --a-dir /tmp/old_tree --b-dir . -- --model dla34 --batch-size 256 --dtype float16

An arm with a directory runs `python -m dla_fast` from that directory (`-m` puts the working directory first on
`sys.path`, so each arm loads its own tree, whatever PYTHONPATH says). Prints one line per (model, dtype, batch,
implementation): each arm's img/s in the order run, the medians, B / A, and the peak memory of each; `--json`
keeps every arm's rows and that summary.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

KEY = ("model", "dtype", "batch_size", "impl")


def _setting(pairs: Sequence[str], flag: str, parser: argparse.ArgumentParser) -> Dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            parser.error(f"{flag} takes VAR=value settings, got {pair!r}")
        env[name] = value
    return env


def figure(row: Dict) -> Optional[float]:
    """A bench row's throughput: img/s of a single-process run, rank 0 alone of a distributed one (the captured
    training steps have only that)."""
    for k in ("img_per_s", "single_img_per_s"):
        if row.get(k) is not None:
            return float(row[k])
    return None


def summarize(arms: Sequence[Dict]) -> List[Dict]:
    """Per (model, dtype, batch, impl): the arms' figures in the order run, each side's median and B / A.
    ``arms``: {"arm": "A" | "B", "rows": [bench rows]} in run order."""
    seen: Dict[Tuple, Dict] = {}
    for arm in arms:
        for row in arm.get("rows") or []:
            key = tuple(row.get(k) for k in KEY)
            s = seen.setdefault(key, {**dict(zip(KEY, key)), "A": [], "B": [], "peak_mb_A": None, "peak_mb_B": None,
                                      "errors": []})
            v = figure(row)
            if row.get("error") or v is None:
                s["errors"].append(f"{arm['arm']}: {row.get('error') or 'no figure'}")
                continue
            s[arm["arm"]].append(v)
            if row.get("peak_mem_mb") is not None:
                s["peak_mb_" + arm["arm"]] = row["peak_mem_mb"]
    out = []
    for s in seen.values():
        a = statistics.median(s["A"]) if s["A"] else None
        b = statistics.median(s["B"]) if s["B"] else None
        out.append({**s, "median_A": a, "median_B": b, "b_over_a": round(b / a, 4) if a and b else None})
    return out


def format_table(summary: Sequence[Dict]) -> str:
    lines = ["| model | dtype | batch | impl | A img/s | B img/s | median A | median B | B / A | peak MB A / B |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        def f(v):
            return "-" if v is None else f"{v:.1f}"
        lines.append(f"| {s['model']} | {s['dtype']} | {s['batch_size']} | {s['impl']} | "
                     f"{' '.join(f(v) for v in s['A']) or '-'} | {' '.join(f(v) for v in s['B']) or '-'} | "
                     f"{f(s['median_A'])} | {f(s['median_B'])} | "
                     f"{'-' if s['b_over_a'] is None else format(s['b_over_a'], '.3f')} | "
                     f"{s['peak_mb_A'] or '-'} / {s['peak_mb_B'] or '-'} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", nargs="*", default=[], metavar="VAR=value", help="arm A's environment settings")
    p.add_argument("--b", nargs="*", default=[], metavar="VAR=value", help="arm B's environment settings")
    p.add_argument("--a-dir", default=None, help="run arm A's `python -m dla_fast` from this tree")
    p.add_argument("--b-dir", default=None, help="run arm B's `python -m dla_fast` from this tree")
    p.add_argument("--rounds", type=int, default=2, help="pairs of arms (default 2: A B A B)")
    p.add_argument("--timeout", type=float, default=None, help="seconds an arm may take")
    p.add_argument("--json", default=None, help="write every arm's rows and the summary here")
    a = p.parse_args(argv)
    if not bench_args:
        p.error("give the bench arguments after '--' (e.g. -- --model dla34 --batch-size 256)")
    if any(t == "--json" or t.startswith("--json=") for t in bench_args):
        p.error("--json after '--' is ab.py's to set (each arm writes its own); pass --json before '--'")
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    env_a, env_b = _setting(a.a, "--a", p), _setting(a.b, "--b", p)
    if env_a == env_b and a.a_dir == a.b_dir:
        p.error("the two arms are the same: give --a/--b settings or --a-dir/--b-dir that differ")
    for d in (a.a_dir, a.b_dir):
        if d is not None and not os.path.isdir(os.path.join(d, "dla_fast")):
            p.error(f"{d} holds no dla_fast package to run")
    arms: List[Dict] = []
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, a.rounds + 1):
            for name, env, cwd in (("A", env_a, a.a_dir), ("B", env_b, a.b_dir)):
                out = os.path.join(tmp, f"{name}{r}.json")
                cmd = [sys.executable, "-m", "dla_fast", "bench", *bench_args, "--json", out]
                t0 = time.perf_counter()
                print(f"ab: {name}{r} {' '.join(f'{k}={v}' for k, v in env.items()) or '(no settings)'}"
                      f"{f' in {cwd}' if cwd else ''}", file=sys.stderr, flush=True)
                try:
                    rc = subprocess.call(cmd, cwd=cwd, env={**os.environ, **env}, timeout=a.timeout,
                                         stdout=2)  # the arm's table and log go to our stderr
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                rows = json.load(open(out))["rows"] if os.path.exists(out) else []
                if rc != 0:
                    failed += 1
                    print(f"ab: {name}{r} ended with {rc}", file=sys.stderr, flush=True)
                arms.append({"arm": name, "round": r, "env": env, "dir": cwd, "rc": rc,
                             "seconds": round(time.perf_counter() - t0, 1), "rows": rows})
    summary = summarize(arms)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bench_args": bench_args, "arms": arms, "summary": summary}, f, indent=1)
    print(format_table(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
