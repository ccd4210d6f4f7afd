"""Markdown table and plot from an end-to-end benchmark JSON (``python -m dla_fast bench --json``).

    python benchmarks/report.py results/X.json --md results/X.md --png results/X.png
    python benchmarks/report.py dla34.json dla102.json --merge X.json   # one file from runs of one model each

The JSON is ``{"device", "torch", "triton", "cudnn", "date", "rows": [{"model", "dtype", "batch_size", "impl",
"img_per_s", "ms", "peak_mem_mb", "rel_err", ["first_s"], ["error"]}]}`` (older runs: ``compile_s``). Speedups
are throughput ratios (img/s of the implementation over img/s of the baseline; > 1 means faster than the baseline).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

IMPL_ORDER = ("timm_eager", "torch_compile", "torch_compile_reduce_overhead", "dla_fast_eager", "dla_fast_triton",
              "dla_fast_cuda", "dla_fast_auto", "dla_fast_cudagraph")
SHORT = {"timm_eager": "timm eager", "torch_compile": "compile", "torch_compile_reduce_overhead": "compile-RO",
         "dla_fast_eager": "ours eager", "dla_fast_triton": "ours triton", "dla_fast_cuda": "ours cuda",
         "dla_fast_auto": "ours auto", "dla_fast_cudagraph": "ours cudagraph"}
DTYPE_ORDER = ("float32", "float16", "bfloat16")

Key = Tuple[str, str, int]


def load(path: str) -> Dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: expected an object with a 'rows' list (the output of `python -m dla_fast bench "
                         f"--json`)")
    for i, r in enumerate(data["rows"]):
        missing = [k for k in ("model", "dtype", "batch_size", "impl") if k not in r]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {', '.join(missing)}: {r}")
    return data


# Header fields that runs merged into one file must share: rows measured under different software, cards or
# settings are not one result.
SAME_FIELDS = ("device", "torch", "triton", "cuda", "cudnn", "cudnn_benchmark", "dla_fast", "python", "mode",
               "world_size", "hw", "features")
ROW_KEY = ("model", "dtype", "batch_size", "impl", "mode", "hw", "features")


def _hashable(v):
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def merge(datas: Sequence[Dict], names: Sequence[str]) -> Dict:
    """One result from several ``bench --json`` results of the same setting (e.g. one process per model): the
    first one's header, the rows of all, ``sources`` naming the inputs and ``date`` spanning their dates. Raises
    ValueError when a header field of SAME_FIELDS differs or a row (model, dtype, batch, impl, ...) repeats."""
    if not datas:
        raise ValueError("nothing to merge")
    out = {k: v for k, v in datas[0].items() if k != "rows"}
    for name, d in zip(names[1:], datas[1:]):
        for k in SAME_FIELDS:
            if d.get(k) != out.get(k):
                raise ValueError(f"{name}: {k} is {d.get(k)!r}, {names[0]} has {out.get(k)!r}; runs that differ "
                                 f"there are not one result")
    rows, seen = [], {}
    for name, d in zip(names, datas):
        for r in d["rows"]:
            key = tuple(_hashable(r.get(k)) for k in ROW_KEY)
            if key in seen:
                raise ValueError(f"{name}: row {dict(zip(ROW_KEY, key))} is also in {seen[key]}")
            seen[key] = name
            rows.append(r)
    dates = sorted({str(d["date"]) for d in datas if d.get("date")})
    if dates:
        out["date"] = dates[0] if len(dates) == 1 else f"{dates[0]}..{dates[-1]}"
    out["sources"] = [os.path.basename(n) for n in names]
    out["rows"] = rows
    return out


def _ok(r: Optional[Dict]) -> bool:
    v = None if r is None else r.get("img_per_s")
    return v is not None and not r.get("error") and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _order(values, preferred) -> List:
    pref = [v for v in preferred if v in values]
    return pref + sorted(v for v in values if v not in preferred)


def _model_key(m: str):
    # dla34 < dla46_c < dla60 < dla60x < dla102 ...: by depth first, then the name.
    digits = "".join(ch for ch in m[3:] if ch.isdigit()) if m.startswith("dla") else ""
    return (int(digits) if digits else 10 ** 6, m)


def index(data: Dict):
    table: Dict[Key, Dict[str, Dict]] = {}
    for r in data["rows"]:
        table.setdefault((r["model"], r["dtype"], int(r["batch_size"])), {})[r["impl"]] = r
    impls = _order({r["impl"] for r in data["rows"]}, IMPL_ORDER)
    keys = sorted(table, key=lambda k: (_model_key(k[0]), DTYPE_ORDER.index(k[1]) if k[1] in DTYPE_ORDER else 9,
                                        k[2]))
    return table, impls, keys


def ratio(row: Optional[Dict], base: Optional[Dict]) -> Optional[float]:
    if not (_ok(row) and _ok(base)):
        return None
    return row["img_per_s"] / base["img_per_s"]


def best_ours(rows: Dict[str, Dict]) -> Optional[Dict]:
    mine = [r for i, r in rows.items() if i.startswith("dla_fast") and _ok(r)]
    return max(mine, key=lambda r: r["img_per_s"]) if mine else None


def _f(v, spec, none="-") -> str:
    return none if v is None else format(v, spec)


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def to_markdown(data: Dict) -> str:
    table, impls, keys = index(data)
    out = [f"## End-to-end inference: {data.get('device', '?')}", "",
           f"torch {data.get('torch')}, triton {data.get('triton')}, cuDNN {data.get('cudnn')}, {data.get('date')}. "
           "Throughput in images/s (higher is better); x = throughput ratio (> 1: faster than the baseline); "
           "rel_err = relative L2 error of the logits against the fp32 reference.", ""]
    head = ["model", "dtype", "batch"] + [SHORT.get(i, i) for i in impls] + \
        ["best ours", "x timm eager", "x compile", "rel_err"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|---|---|--:|" + "--:|" * len(impls) + "---|--:|--:|--:|")
    notes = []
    for k in keys:
        rows = table[k]
        cells = []
        for i in impls:
            r = rows.get(i)
            if r is None:
                cells.append("")
            elif _ok(r):
                cells.append(_num(r["img_per_s"]))
            else:
                notes.append(f"- {k[0]} {k[1]} bs{k[2]} {i}: {r.get('error') or 'no throughput'}")
                cells.append(f"err[{len(notes)}]")
        b = best_ours(rows)
        cells += [SHORT.get(b["impl"], b["impl"]) if b else "-",
                  _f(ratio(b, rows.get("timm_eager")), ".2f"), _f(ratio(b, rows.get("torch_compile")), ".2f"),
                  _f(b.get("rel_err") if b else None, ".1e")]
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")

    out += ["", "### Details", ""]
    out.append("| model | dtype | batch | impl | img/s | ms | x timm eager | x compile | rel_err | peak MB "
               "| first result s |")
    out.append("|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|")
    for k in keys:
        rows = table[k]
        for i in impls:
            r = rows.get(i)
            if r is None:
                continue
            ok = _ok(r)
            out.append("| " + " | ".join([
                k[0], k[1], str(k[2]), i,
                _num(r["img_per_s"]) if ok else "err" if r.get("error") else "-",
                _f(r.get("ms") if ok else None, ".3f"),
                _f(ratio(r, rows.get("timm_eager")), ".2f"), _f(ratio(r, rows.get("torch_compile")), ".2f"),
                _f(r.get("rel_err"), ".1e"), _f(r.get("peak_mem_mb"), ".0f"),
                _f(r.get("first_s", r.get("compile_s")), ".1f")]) + " |")
    if notes:
        out += ["", "Errors:", *notes]
    return "\n".join(out) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("report.py --png needs matplotlib: pip install 'dla_fast[bench]' (or pip install "
                         "matplotlib); the markdown table works without it") from e
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def plot(data: Dict, path: str) -> str:
    """Per dtype, at each model's largest batch: img/s per model grouped by implementation (top) and the
    ratio to torch_compile (bottom)."""
    plt = _pyplot()
    table, impls, keys = index(data)
    dtypes = _order({k[1] for k in keys}, DTYPE_ORDER)
    if not dtypes:
        raise ValueError("no rows to plot")
    fig, axes = plt.subplots(2, len(dtypes), figsize=(max(6.0, 1.1 * len(impls) * len(dtypes) + 4), 8.5),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    colors = {i: cmap(j % 10) for j, i in enumerate(impls)}
    for col, dt in enumerate(dtypes):
        models = sorted({k[0] for k in keys if k[1] == dt}, key=_model_key)
        big = {m: max(k[2] for k in keys if k[0] == m and k[1] == dt) for m in models}
        top, bot = axes[0][col], axes[1][col]
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys, rs = [], [], []
            for mi, m in enumerate(models):
                rows = table[(m, dt, big[m])]
                r = rows.get(impl)
                x = mi - 0.4 + width * (j + 0.5)
                if _ok(r):
                    xs.append(x)
                    ys.append(r["img_per_s"])
                    rr = ratio(r, rows.get("torch_compile"))
                    rs.append(rr if rr is not None else math.nan)
                elif r is not None:
                    top.text(x, 0, "error", ha="center", va="bottom", rotation=90, color=colors[impl], fontsize=8)
            if xs:
                top.bar(xs, ys, width, color=colors[impl], label=SHORT.get(impl, impl))
                bot.bar(xs, rs, width, color=colors[impl], label=SHORT.get(impl, impl))
        sizes = sorted(set(big.values()))
        bs = f"batch {sizes[0]}" if len(sizes) == 1 else "largest batch"
        top.set_title(f"{dt}, {bs}")
        top.set_ylabel("images / s")
        bot.set_ylabel("x torch.compile (throughput ratio)")
        bot.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        for ax in (top, bot):
            ax.set_xticks(range(len(models)))
            ax.set_xticklabels([m if len(sizes) == 1 else f"{m}\nbs{big[m]}" for m in models], rotation=25, ha="right")
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
    seen: Dict[str, object] = {}  # one legend for all panels: an impl may be missing from some dtype
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(len(seen), 8), frameon=False)
    fig.suptitle(f"DLA inference throughput on {data.get('device', '?')} (torch {data.get('torch')})")
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="result JSON of `python -m dla_fast bench --json` (several: merged)")
    p.add_argument("--merge", default=None, metavar="OUT.json", help="write the merged JSON of the inputs here")
    p.add_argument("--md", default=None, help="write the markdown here (default: print it)")
    p.add_argument("--png", default=None, help="write the plot here (needs matplotlib)")
    a = p.parse_args(argv)
    if a.png:
        _pyplot()  # fail before writing anything when matplotlib is missing
    try:
        datas = [load(j) for j in a.json]
        data = datas[0] if len(datas) == 1 else merge(datas, a.json)
    except (OSError, ValueError) as e:
        p.error(str(e))
    if a.merge:
        d = os.path.dirname(a.merge)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(a.merge, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {a.merge} ({len(data['rows'])} rows from {len(a.json)} file(s))")
        if not a.md and not a.png:
            return 0
    md = to_markdown(data)
    if a.md:
        d = os.path.dirname(a.md)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(a.md, "w") as f:
            f.write(md)
        print(f"wrote {a.md}")
    else:
        print(md, end="")
    if a.png:
        print(f"wrote {plot(data, a.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
