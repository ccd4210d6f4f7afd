"""CPU checks of the benchmark tooling: the shape source (dla_fast.shapes), the op harness (benchmarks/opbench.py:
timing, op-run CSV, JSON conversion, summary, sanitize driver), the end-to-end report, the Triton compile tool."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import dla_fast
from dla_fast import shapes
from dla_fast.shapes import OpShape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH = os.path.join(ROOT, "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

import ab  # noqa: E402
import opbench  # noqa: E402
import report  # noqa: E402

# Fused layers per variant (the model_layers of the committed H100 op runs, which hooked the real models).
LAYERS = {"dla34": 37, "dla46_c": 48, "dla46x_c": 48, "dla60": 63, "dla60x": 63, "dla60x_c": 62, "dla102": 105,
          "dla102x": 105, "dla102x2": 105, "dla169": 168, "dla60_res2net": 95, "dla60_res2next": 95}


def _find(entries, **kw):
    return [e for e in entries if all(getattr(e.shape, k) == v for k, v in kw.items())]


# ------------------------------------------------------------------------------------------- shape source

def test_dla34_shapes_come_from_the_model():
    entries = shapes.distinct_shapes(("dla34",), batch=8, hw=224)
    fused = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float32, backend="eager")
    ops = [n for n, m in fused.fused_layers() if m.OP in ("conv_bn_act", "aggregate")]  # the pools have no shape
    n_fused = len(ops)
    assert sum(e.count for e in entries) == n_fused == len(shapes.layer_records("dla34", 224))
    assert sorted(x.split(":", 1)[1] for e in entries for x in e.layers) == sorted(ops)
    assert len(entries) < n_fused  # repeated blocks collapse into shared shapes

    stem, = _find(entries, op="conv_bn_act", cin=(3,), kernel=(7, 7))
    assert stem.shape.hw == (224, 224) and stem.shape.out_hw == (224, 224)
    assert (stem.shape.cout, stem.shape.stride, stem.shape.padding, stem.shape.groups) == (16, (1, 1), (3, 3), 1)
    assert stem.layers == ["dla34:base_layer.0"] and stem.batch == 8
    assert stem.shape.input_shapes(8) == [(8, 3, 224, 224)]
    assert stem.shape.flops(8) == 2 * 8 * 224 * 224 * 16 * 3 * 49

    root5, = [e for e in entries if e.layers == ["dla34:level5.root"]]
    s = root5.shape
    assert (s.op, s.cin, s.cout, s.hw, s.residual, s.relu) == ("aggregate", (512, 512, 256), 512, (7, 7), "none", True)
    assert s.weight_shape == (512, 1280)
    # Every root split, as the fusion pass wires the children (tree2, tree1, then the level-root inputs).
    splits = sorted(e.shape.cin for e in entries if e.shape.op == "aggregate")
    assert splits == sorted([(64, 64), (128, 128), (128, 128, 64, 128), (256, 256), (256, 256, 128, 256),
                             (512, 512, 256)])
    # The projections are conv+BN without ReLU; each DlaBasic's second conv adds the residual.
    assert {e.shape.relu for e in entries if e.shape.kernel == (1, 1) and e.shape.op == "conv_bn_act"} == {False}
    n_res = sum(e.count for e in entries if e.shape.residual == "tensor")
    assert n_res == sum(1 for n, _ in fused.fused_layers() if n.endswith("conv2"))
    # timm reports 3.07 GMACs for dla34 at 224 (the fc adds 0.5M).
    macs = sum(r.shape.flops(1) for r in shapes.layer_records("dla34", 224)) / 2
    assert 3.0e9 < macs < 3.1e9


def test_meta_forward_records_what_a_real_forward_sees():
    """The shapes come from a forward on the meta device; a real CPU forward of the same model must give the
    same layers, shapes, channel pitches and slice offsets (Res2Net's split views are where they could differ)."""
    name, hw = "dla60_res2net", (63, 95)
    fused = dla_fast.optimize(dla_fast.create_model(name).eval(), dtype=torch.float32, backend="eager")
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a, k, n=n: seen.append((n, shapes._record(m, a, k))),
                                         with_kwargs=True) for n, m in fused.fused_layers()
             if m.OP in ("conv_bn_act", "aggregate")]
    try:
        with torch.no_grad():
            fused(torch.randn(1, 3, *hw))
    finally:
        for h in hooks:
            h.remove()
    recs = [(r.name, r.shape) for r in shapes.layer_records(name, hw)]
    assert recs == seen
    assert any(s.pitches != s.cin and any(s.offsets) for _, s in recs)  # the slices are really there


@pytest.mark.parametrize("hw", [224, "512x512", (608, 1088)], ids=["224", "512x512", "608x1088"])
def test_every_variant_at_classification_and_detection_sizes(hw):
    h, w = shapes.parse_hw(hw)
    assert set(LAYERS) == set(dla_fast.list_models())
    for name, n in LAYERS.items():
        recs = shapes.layer_records(name, hw)
        assert len(recs) == n, name
        first, last = recs[0].shape, recs[-1].shape
        assert (first.op, first.cin, first.hw) == ("conv_bn_act", (3,), (h, w)), name
        assert last.op == "aggregate" and last.hw == (-(-h // 32), -(-w // 32)), name  # the last level's root
        for r in recs:
            s = r.shape
            assert s.cout > 0 and min(s.hw) > 0 and min(s.out_hw) > 0 and s.flops(1) > 0, (name, r.name)
        if "res2ne" in name:
            assert any(r.shape.pitches != r.shape.cin for r in recs), name
    entries = shapes.distinct_shapes(dla_fast.list_models(), batch=256, hw=hw)
    assert sum(e.count for e in entries) == sum(LAYERS.values())
    assert len({e.shape.ident() for e in entries}) == len(entries)
    if (h, w) == (512, 512):  # every level's map grows by 512/224 in each dimension: FLOPs by its square
        ratio = (sum(r.shape.flops(1) for r in shapes.layer_records("dla34", hw))
                 / sum(r.shape.flops(1) for r in shapes.layer_records("dla34", 224)))
        assert ratio == pytest.approx((512 / 224) ** 2, rel=1e-9)


def test_shapes_follow_input_size_and_cli(capsys):
    entries = shapes.distinct_shapes("dla34", batch=2, hw=64)
    root5, = [e for e in entries if e.layers == ["dla34:level5.root"]]
    assert root5.shape.hw == (2, 2)
    assert shapes.OpShape.from_dict(root5.shape.to_dict()) == root5.shape
    assert shapes.main(["dla34", "--batch", "2", "--hw", "64"]) == 0
    out = capsys.readouterr().out
    assert "2x3x64x64" in out and "distinct shapes over 37 layers" in out
    assert shapes.main(["dla34", "--batch", "1", "--hw", "512x512"]) == 0
    assert "1x3x512x512" in capsys.readouterr().out
    assert shapes.main(["dla34", "--batch", "1", "--hw", "608", "1088"]) == 0
    assert "input 608x1088" in capsys.readouterr().out


def test_python_m_dla_fast_shapes():
    p = subprocess.run([sys.executable, "-m", "dla_fast.shapes", "dla34", "--hw", "512x512"], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "25 distinct shapes over 37 layers" in p.stdout and "input 512x512" in p.stdout


@pytest.mark.parametrize("hw,expect", [(224, (224, 224)), ("512x512", (512, 512)), ("608X1088", (608, 1088)),
                                       ("96", (96, 96)), ((608, 1088), (608, 1088)), (["63", "95"], (63, 95))])
def test_parse_hw(hw, expect):
    assert shapes.parse_hw(hw) == expect


@pytest.mark.parametrize("hw,msg", [("abc", "not H, HxW"), (0, "must be positive"), ((1, 2, 3), "not H, HxW"),
                                    ("-5", "not H, HxW"), (True, "not H, HxW")])
def test_parse_hw_rejects_bad_sizes(hw, msg):
    with pytest.raises(ValueError, match=msg):
        shapes.parse_hw(hw)


def test_shape_source_errors_are_clear(capsys):
    with pytest.raises(ValueError, match="unknown model 'dla35'; available: .*dla34"):
        shapes.layer_records("dla35")
    with pytest.raises(ValueError, match="32k-1 or 32k"):  # the model's own message for a size it rejects
        shapes.layer_records("dla34", 100)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        shapes.distinct_shapes("dla34", batch=0)
    with pytest.raises(SystemExit):
        shapes.main(["dla34", "--hw", "100"])
    assert "32k-1 or 32k" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shapes.main(["nope"])
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_flops_and_bytes_of_grouped_and_aggregate_shapes():
    g = OpShape("conv_bn_act", (128,), (28, 28), 128, (3, 3), (2, 2), (1, 1), groups=32, residual="none")
    assert g.out_hw == (14, 14) and g.weight_shape == (128, 4, 3, 3)
    assert g.flops(2) == 2 * (2 * 14 * 14) * 128 * 4 * 9
    a = OpShape("aggregate", (64, 64), (8, 8), 64, residual="child0")
    t = OpShape("aggregate", (64, 64), (8, 8), 64, residual="tensor")
    out = 2 * 8 * 8 * 64 * 2
    # child0 re-reads an input (already counted); a separate residual tensor is one more output-sized read.
    assert t.min_bytes(2, 2) - a.min_bytes(2, 2) == out
    assert a.min_bytes(2, 2) == 2 * 8 * 8 * 128 * 2 + 64 * 128 * 2 + 64 * 4 + out


# ------------------------------------------------------------------------------------------------ opbench

@pytest.mark.parametrize("shape", [
    OpShape("conv_bn_act", (16,), (12, 12), 32, (3, 3), (2, 2), (1, 1), residual="tensor"),
    OpShape("conv_bn_act", (32,), (8, 8), 32, (3, 3), (1, 1), (1, 1), groups=8, pitches=(48,), offsets=(12,)),
    OpShape("aggregate", (32, 32, 16), (6, 6), 32, residual="child0"),
], ids=["conv-s2-res", "grouped-pitched", "agg-child0"])
def test_opbench_cpu_eager(shape):
    entry = shapes.ShapeEntry(shape, batch=2, count=1, layers=["x:y"])
    rows = opbench.bench_shape(entry, torch.float32, "cpu", ("eager", "cudnn_conv", "eager_seq"), warmup=1, rep=2)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"eager", "cudnn_conv", "eager_seq"}
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and math.isfinite(r["ms"])
        assert r["flops"] == shape.flops(2) and r["tflops"] > 0 and r["gbps"] > 0
    assert by["eager"]["rel_err"] < 1e-5  # the fused op computes what conv -> BN -> (+res) -> ReLU computes
    assert by["eager"]["speedup_vs_eager_seq"] == pytest.approx(by["eager_seq"]["ms"] / by["eager"]["ms"])
    case = opbench.build_case(shape, 2, torch.float32, "cpu")
    for t in case.inputs:
        assert t.ne(0).float().mean() > 0.99 and t.is_contiguous(memory_format=torch.channels_last) == (
            shape.pitches == shape.cin)
    assert case.x.stride(1) == 1 and case.x.stride(3) == shape.pitches[0]  # NHWC; the pitched one is a slice
    assert case.x.storage_offset() == shape.offsets[0]


def test_opbench_cli_cpu(tmp_path, capsys):
    js, md, cs = tmp_path / "o.json", tmp_path / "o.md", tmp_path / "o.csv"
    # "cuda" cannot run on CPU tensors: the run records why and goes on (triton would too, but importing it
    # pulls in torch._inductor, seconds this test does not need).
    argv = ["--device", "cpu", "--batch", "2", "--hw", "64", "--dtypes", "float32", "--models", "dla34",
            "--limit", "2", "--impls", "eager", "cuda", "cudnn_conv", "eager_seq", "--warmup", "1", "--rep", "1",
            "--json", str(js), "--md", str(md), "--csv", str(cs)]
    assert opbench.main(argv) == 0
    data = json.loads(js.read_text())
    for k in ("device", "torch", "triton", "cudnn", "date"):
        assert k in data
    assert data["command"].startswith("python benchmarks/opbench.py --device cpu --batch 2")
    assert len(data["shapes"]) == 2 and len(data["rows"]) == 2 * 4
    assert all(r.get("skipped") and r["ms"] is None for r in data["rows"] if r["impl"] == "cuda")
    assert all(r["ms"] > 0 for r in data["rows"] if r["impl"] != "cuda")
    text = md.read_text()
    assert "conv 3->16 k7x7 @64x64" in text and "| dla34 | 2/37 | float32 |" in text and "Skipped:" in text
    assert "[  2/2]" in capsys.readouterr().out
    meta, rows = opbench.read_csv(str(cs))
    assert meta["command"] == data["command"] and meta["date"] == data["date"][:10]
    assert meta["timer"] == "perf_counter median, warmup 1 ms, rep 1 ms"
    assert len(meta["skipped"]) == 1 and meta["skipped"][0].startswith("cuda (float32): ")
    assert [(r["shape"].ident(), r["impl"]) for r in rows] == [
        (r["shape_id"], r["impl"]) for r in data["rows"] if r["impl"] != "cuda"]
    stem = rows[0]
    assert (stem["op"], stem["in_channels"], stem["kernel"], stem["in_hw"], stem["batch"], stem["count"]) == (
        "conv_bn_act", (3,), (7, 7), (64, 64), 2, 1)


def test_opbench_cli_errors(capsys):
    for argv, msg in [(["--device", "cpu", "--hw", "100"], "32k-1 or 32k"),
                      (["--device", "cpu", "--hw", "0"], "--hw: input size '0' must be positive"),
                      (["--device", "cpu", "--batch", "0"], "--batch must be at least 1"),
                      (["--device", "cpu", "--models", "dla34", "--match", "nothing-like-this"], "selects none"),
                      (["--device", "cpu", "--impls", "fast"], "unknown implementation 'fast'"),
                      (["--device", "cpu", "--dtypes", "float64"], "unknown dtype 'float64'")]:
        with pytest.raises(SystemExit):
            opbench.main(argv)
        assert msg in capsys.readouterr().err, argv


def test_opbench_timer_choice():
    """Small batches are timed by CUDA-graph replay (their launches outlast the kernels), large ones by
    do_bench; the CPU always by perf_counter; "host" and "none" are what they say everywhere."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert opbench.timer_name(cuda, "auto", 1) == "cudagraph"
    assert opbench.timer_name(cuda, "auto", opbench.SMALL_BATCH) == "cudagraph"
    assert opbench.timer_name(cuda, "auto", opbench.SMALL_BATCH + 1) in ("triton.testing.do_bench", "cuda_events")
    assert opbench.timer_name(cuda, "cudagraph", 256) == "cudagraph"
    assert opbench.timer_name(cuda, "do_bench", 1) != "cudagraph"
    assert opbench.timer_name(cpu, "cudagraph", 1) == "perf_counter"
    assert opbench.timer_name(cuda, "host", 1) == opbench.timer_name(cpu, "host", 256) == "host"
    assert opbench.timer_name(cuda, "none", 1) == "none"
    calls = []
    assert opbench.time_ms(lambda: calls.append(1), "cpu", warmup=1, rep=1, timer="host") > 0
    assert len(calls) >= 4 * 50  # one estimate and at least three samples of 50 back-to-back calls


def test_opbench_timer_none_calls_once(monkeypatch):
    """--timer none (gpu.sh ncu): each implementation runs once, nothing is timed."""
    entry = shapes.ShapeEntry(OpShape("conv_bn_act", (8,), (6, 6), 8, (3, 3), (1, 1), (1, 1)), batch=1, count=1)
    monkeypatch.setattr(opbench, "time_ms", lambda *a, **k: pytest.fail("timed under --timer none"))
    rows = opbench.bench_shape(entry, torch.float32, "cpu", ("eager", "eager_seq"), check=False, timer="none")
    assert [(r["impl"], r["ms"], r.get("error")) for r in rows] == [("eager", None, None), ("eager_seq", None, None)]


# ------------------------------------------------------------------------------------------- op-run CSV

_SHAPES = [
    OpShape("conv_bn_act", (3,), (224, 224), 16, (7, 7), (1, 1), (3, 3)),
    OpShape("aggregate", (128, 128), (56, 56), 128, residual="child0"),
    OpShape("conv_bn_act", (28,), (112, 112), 28, (3, 3), (2, 2), (1, 1), pitches=(112,), offsets=(28,)),
    OpShape("aggregate", (28, 28, 28, 28), (56, 56), 128, residual="tensor", pitches=(28, 28, 28, 112),
            offsets=(0, 0, 0, 84)),
    OpShape("conv_bn_act", (64,), (28, 28), 128, (1, 1), relu=False),
]


def _tiny_run(impls=("cuda", "triton", "eager_seq"), dtypes=("float16", "bfloat16"), batch=256, drop=0):
    """A synthetic opbench --json result over _SHAPES: every row timed, except the last ``drop`` (a partial run),
    one skipped implementation, one error and one wrong result."""
    entries = [shapes.ShapeEntry(s, batch, count=i + 1, layers=[f"m:l{i}"] * (i + 1), models=["m"])
               for i, s in enumerate(_SHAPES)]
    rows = []
    for dt in dtypes:
        for i, e in enumerate(entries):
            for j, impl in enumerate(impls):
                rows.append({"shape_id": e.shape.ident(), "label": e.shape.label(), "op": e.shape.op, "batch": batch,
                             "dtype": dt, "count": e.count, "impl": impl, "ms": 0.001234567 * (1 + i + 10 * j) * batch,
                             "rel_err": 1e-3})
    rows[1]["rel_err"] = 0.5  # a fast wrong kernel
    rows[2].update(ms=None, error="RuntimeError: boom")
    rows[4].update(ms=None, skipped="no GPU")
    rows = rows[:len(rows) - drop]
    env = {"device": "NVIDIA H100 80GB HBM3", "capability": "9.0", "torch": "2.11.0+cu130", "triton": "3.6.0",
           "cudnn": 91900, "cuda": "13.0", "dla_fast": "0.1.0", "git_commit": "3a74e45",
           "date": "2026-11-26T12:54:34+00:00"}
    return {"env": env, **env, "models": ["m"], "dtypes": list(dtypes), "batch": batch, "hw": [224, 224],
            "impls": list(impls), "warmup": 25, "rep": 100, "timer": "triton.testing.do_bench",
            "shapes": [e.to_dict() for e in entries], "rows": rows}


def test_csv_round_trip(tmp_path):
    run = _tiny_run()
    path = tmp_path / "ops.csv"
    opbench.write_csv(str(path), run)
    text = path.read_text().splitlines()
    assert text[:5] == [
        "# dla_fast op benchmark (benchmarks/opbench.py)",
        "# device: NVIDIA H100 80GB HBM3 (compute capability 9.0)",
        "# versions: torch 2.11.0+cu130, triton 3.6.0, cuDNN 91900, CUDA 13.0, dla_fast 0.1.0",
        "# date: 2026-11-26; commit: 3a74e45; timer: triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
        "# command: python benchmarks/opbench.py --models m --dtypes float16 bfloat16 --batch 256 --impls cuda "
        "triton eager_seq"]
    assert ",".join(opbench.CSV_COLUMNS) in text
    assert "conv_bn_act,3,16,7x7,1x1,3x3,1,224x224,none,1,float16,256,cuda,0.31605,1," in text
    assert "aggregate,28+28+28+28,128,1x1,1x1,0x0,1,56x56,tensor,1,float16,256,cuda,1.26420,4,28+28+28+112@84" in text
    meta, rows = opbench.read_csv(str(path))
    assert meta["device"] == "NVIDIA H100 80GB HBM3 (compute capability 9.0)" and meta["commit"] == "3a74e45"
    assert meta["wrong"] == [f"{_SHAPES[0].ident()} float16 triton: rel_err 5.00e-01 vs eager_seq"]
    assert meta["error"] == [f"{_SHAPES[0].ident()} float16 eager_seq: RuntimeError: boom"]
    assert meta["skipped"] == ["triton (float16): no GPU"] and "partial" not in meta
    kept = [r for r in run["rows"] if r["ms"] and r["rel_err"] < 0.1]
    assert len(rows) == len(kept) == len(run["rows"]) - 3
    by_id = {s.ident(): s for s in _SHAPES}
    for got, want in zip(rows, kept):
        assert got["shape"] == by_id[want["shape_id"]]
        assert (got["dtype"], got["impl"], got["batch"], got["count"]) == (
            want["dtype"], want["impl"], want["batch"], want["count"])
        assert got["ms"] == pytest.approx(want["ms"], rel=1e-4)  # at least 5 significant digits
    pitched = [r for r in rows if r["pitches"]]
    assert {r["shape"].offsets for r in pitched} == {(28,), (0, 0, 0, 84)}


def test_csv_keeps_small_times_significant(tmp_path):
    run = _tiny_run(batch=1)
    path = tmp_path / "bs1.csv"
    opbench.write_csv(str(path), run)
    assert "conv_bn_act,3,16,7x7,1x1,3x3,1,224x224,none,1,float16,1,cuda,0.0012346,1," in path.read_text()
    for got in opbench.read_csv(str(path))[1]:
        assert got["ms"] < 0.1


@pytest.mark.parametrize("edit,msg", [
    (lambda t: t.replace("# dla_fast op benchmark", "# something else"), "not an op-run CSV"),
    (lambda t: t.replace(",count,", ",layers,"), "lacks count"),
    (lambda t: t.replace(",7x7,", ",7,", 1), "line 10: kernel '7' is not 2 non-negative integers"),
    (lambda t: t.replace(",0.31605,", ",-1,", 1), "line 10: ms, batch and count must be positive"),
    (lambda t: t.replace("28+28+28+112@84", "28+112@84", 1), "pitches '28\\+112' is not 4"),
])
def test_read_csv_rejects_bad_files(tmp_path, edit, msg):
    path = tmp_path / "bad.csv"
    opbench.write_csv(str(path), _tiny_run())
    path.write_text(edit(path.read_text()))
    with pytest.raises(ValueError, match=msg):
        opbench.read_csv(str(path))


def test_from_json_converts_a_run(tmp_path, capsys):
    src, dst = tmp_path / "2026-11-26-run.json", tmp_path / "run.csv"
    run = _tiny_run(impls=("cuda", "triton"), dtypes=("float16",), batch=1, drop=3)
    src.write_text(json.dumps(run))
    assert opbench.main(["--from-json", str(src), "--csv", str(dst)]) == 0
    assert f"wrote {dst}: {len(run['rows']) - 3} rows" in capsys.readouterr().out
    meta, rows = opbench.read_csv(str(dst))
    planned = len(_SHAPES) * 2
    assert meta["partial"] == f"{planned - 3} of {planned} rows (the run stopped before it measured every shape)"
    assert meta["source"] == ("2026-11-26-run.json, converted by opbench.py --from-json; command rebuilt from the "
                              "run's settings")
    # batch 1 is timed by CUDA-graph replay by default: the rebuilt command says do_bench was asked for
    assert meta["command"].endswith("--batch 1 --impls cuda triton --timer do_bench")
    assert meta["commit"] == "3a74e45" and meta["date"] == "2026-11-26"
    assert len(rows) == len(run["rows"]) - 3  # less the wrong result, the error and the skipped row


def test_from_json_errors(tmp_path, capsys):
    src = tmp_path / "run.json"
    src.write_text(json.dumps({"rows": []}))
    for argv, msg in [(["--from-json", str(src)], "give the output file with --csv"),
                      (["--from-json", str(tmp_path / "nope.json"), "--csv", "x.csv"], "no such run file"),
                      (["--from-json", str(src), "--csv", str(tmp_path / "x.csv")], "not an opbench --json run"),
                      (["--from-json", str(src), "--csv", "x.csv", "--json", "y.json"], "drop --json"),
                      (["--from-json", str(src), "--csv", "x.csv", "--summary", str(src)], "separate modes"),
                      (["--summary", str(src), "--csv", "x.csv"], "--summary reads a saved run and times nothing: "
                                                                  "drop --csv")]:
        with pytest.raises(SystemExit):
            opbench.main(argv)
        assert msg in capsys.readouterr().err, argv


def test_committed_op_runs_read_back():
    """The converted H100 runs: their headers and sizes, read by the reader every consumer uses."""
    for name, rows_expected, partial in (("h100-ops-bs256.csv", 1648, None), ("h100-ops-bs1.csv", 999, "999 of 1236")):
        meta, rows = opbench.read_csv(os.path.join(_BENCH, "results", name))
        assert meta["device"].startswith("NVIDIA H100") and meta["commit"] == "3a74e45"
        assert len(rows) == rows_expected
        assert (meta.get("partial") or "").startswith(partial or "")
        assert {r["impl"] for r in rows} >= {"cuda", "triton", "eager_seq"}
        assert len({r["shape"].ident() for r in rows}) == 206


# ----------------------------------------------------------------------------------------------- summary

def test_summary_counts_losses(tmp_path, capsys):
    def rows(ms):
        return [{"shape_id": s, "dtype": "float16", "impl": impl, "ms": t} for (s, impl), t in ms.items()]
    run = {"rows": rows({("a", "cuda"): 1.0, ("a", "eager_seq"): 2.0, ("a", "triton"): 0.5,
                         ("b", "cuda"): 3.0, ("b", "eager_seq"): 2.0, ("b", "triton"): 3.0})}
    ref = {"rows": rows({("a", "cuda"): 2.0, ("b", "cuda"): 3.0})}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    assert opbench.main(["--summary", str(tmp_path / "run.json"), "--ref", str(tmp_path / "ref.json")]) == 0
    out = capsys.readouterr().out
    assert "cuda: 1 of 2 rows beat eager_seq" in out
    assert f"geomean eager_seq/cuda {math.sqrt(2.0 * 2.0 / 3.0):.3f}" in out
    assert "triton faster on 1 of 2" in out
    assert f"geomean ref/cuda {math.sqrt(2.0):.3f} over 2 rows" in out
    assert "LOSE b float16: 3.0000 ms, eager_seq 2.0000 (0.667x)" in out and "LOSE a" not in out
    (tmp_path / "bad.json").write_text(json.dumps({"rows": rows({("a", "triton"): 1.0})}))
    assert opbench.main(["--summary", str(tmp_path / "bad.json")]) == 2
    assert "needs 'cuda' and 'eager_seq' rows" in capsys.readouterr().out


def test_summary_reads_csv_like_json(tmp_path, capsys):
    run = _tiny_run()
    (tmp_path / "run.json").write_text(json.dumps(run))
    opbench.write_csv(str(tmp_path / "run.csv"), run)
    outs = []
    for path in ("run.json", "run.csv"):
        assert opbench.main(["--summary", str(tmp_path / path), "--summary-impl", "triton"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("triton: 8 of 8 rows beat eager_seq; geomean eager_seq/triton")


# ------------------------------------------------------------------------------------------------ sanitize

def test_sanitize_shapes_cover_every_feature():
    models = dla_fast.list_models()
    picked = opbench.sanitize_shapes(models)
    every = {(e.shape.op, f) for e in shapes.distinct_shapes(models, 2, opbench.SANITIZE_HW)
             for f in opbench._features(e.shape)}
    assert {(e.shape.op, f) for e in picked for f in opbench._features(e.shape)} == every
    assert len(picked) <= 30 and all(e.batch == opbench.SANITIZE_BATCH for e in picked)
    assert any(len(e.shape.cin) == 7 for e in picked)  # dla169's seven-child root
    assert any(e.shape.op == "conv_bn_act" and any(o % 8 for o in e.shape.offsets) for e in picked)  # Res2Net
    assert any(e.shape.hw == opbench.SANITIZE_HW for e in picked)  # the odd-sized front layers


def test_sanitize_cpu_passes(capsys):
    assert opbench.main(["--sanitize", "--device", "cpu", "--impls", "eager", "--models", "dla34", "--limit", "3",
                         "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"sanitize: (\d+) of \1 checks pass \(3 shapes, float32; eager\); 0 failures", out), out


def test_sanitize_fails_on_a_wrong_result(monkeypatch, capsys):
    real = opbench._backend_call

    def off_by_a_bit(mod, case, config):
        fn = real(mod, case, config)
        return lambda: fn() * 1.001
    monkeypatch.setattr(opbench, "_backend_call", off_by_a_bit)
    assert opbench.main(["--sanitize", "--device", "cpu", "--impls", "eager", "--models", "dla34", "--limit", "2",
                         "--dtypes", "float32"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL float32  eager") == 2 and "2 failures" in out


class _FakeCuda:
    """The CUDA backend's interface as the sanitizer uses it: candidate queries returning (family, bn, a_load)
    tuples, the rule's first, and ops taking the config last. Computes on the CPU; config (2, 64, 1) is wrong."""

    NAME = "cuda"

    def __init__(self):
        self.calls = []

    @staticmethod
    def unavailable_reason(x):
        return None

    def conv_candidates(self, x, weight, bias, stride, padding, groups, residual):
        assert weight.dim() == 4 and len(stride) == len(padding) == 2
        return [(1, 128, 2), (2, 64, 1)]

    def aggregate_candidates(self, children, weight, bias, residual):
        assert isinstance(children, list) and weight.dim() == 2
        return [(1, 128, 0)]

    @staticmethod
    def describe(config):
        return "rule" if not config else f"family{config[0]} bn{config[1]}"

    def conv_bn_act(self, x, weight, bias, stride, padding, groups, residual, relu, config=()):
        self.calls.append(("conv", tuple(config)))
        y = opbench.conv_bn_act_ref(x, weight, bias, stride, padding, groups, residual, relu)
        return y + 1 if tuple(config) == (2, 64, 1) else y

    def aggregate(self, children, weight, bias, residual, relu, config=()):
        self.calls.append(("agg", tuple(config)))
        return opbench.aggregate_ref(children, weight, bias, residual, relu)

    def max_pool(self, x, k):
        self.calls.append(("pool", k))
        return torch.nn.functional.max_pool2d(x, k, k)

    @staticmethod
    def last_kernel():
        return "fake"


def test_sanitize_runs_every_cuda_candidate(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(opbench._backends, "get", lambda name: fake)
    monkeypatch.setattr(opbench._backends, "reason_unavailable", lambda name, x: None)
    entries = [shapes.ShapeEntry(OpShape("conv_bn_act", (16,), (7, 9), 32, (3, 3), (2, 2), (1, 1)), batch=2),
               shapes.ShapeEntry(OpShape("aggregate", (32, 16), (5, 7), 32, residual="child0"), batch=2)]
    lines = []
    fails = opbench.sanitize(entries, [torch.float32], ["cuda"], "cpu", log=lines.append)
    assert fake.calls == [("conv", (1, 128, 2)), ("conv", (2, 64, 1)), ("agg", (1, 128, 0)), ("pool", 2)]
    assert fails == 1
    assert [line[:4] for line in lines[:4]] == ["ok  ", "FAIL", "ok  ", "ok  "]
    assert "family1 bn128 =rule" in lines[0] and "family2 bn64" in lines[1] and "[fake]" in lines[0]
    assert lines[-1] == "sanitize: 3 of 4 checks pass (2 shapes, float32; cuda); 1 failures"


def test_sanitize_argument_handling(capsys):
    for argv, msg in [(["--json", "x.json"], "--sanitize checks results and times nothing: drop --json"),
                      (["--csv", "x.csv", "--md", "x.md"], "drop --md, --csv"),
                      (["--impls", "cudnn_conv"], "--sanitize runs backends, not 'cudnn_conv'"),
                      (["--impls", "cuda"], "the cuda backend cannot run here"),
                      (["--hw", "100"], "32k-1 or 32k"),
                      (["--models", "dla34", "--match", "no-such-layer"], "selects none")]:
        with pytest.raises(SystemExit):
            opbench.main(["--sanitize", "--device", "cpu"] + argv)
        assert msg in capsys.readouterr().err, argv


# ------------------------------------------------------------------------------------------ e2e report

def _synthetic(path):
    rows = []
    for model, base in (("dla34", 3000.0), ("dla60", 2000.0)):
        for dt in ("float16", "bfloat16"):
            for bs in (1, 256):
                for impl, k in (("timm_eager", 1.0), ("torch_compile", 1.5), ("dla_fast_triton", 1.8),
                                ("dla_fast_auto", 2.0), ("dla_fast_cudagraph", 1.9)):
                    ips = base * k * (1 if bs == 256 else 0.2)
                    rows.append({"model": model, "dtype": dt, "batch_size": bs, "impl": impl, "img_per_s": ips,
                                 "ms": bs / ips * 1e3, "peak_mem_mb": 900.0, "rel_err": 2e-3})
    rows.append({"model": "dla60", "dtype": "float16", "batch_size": 256, "impl": "dla_fast_cuda",
                 "img_per_s": None, "ms": None, "peak_mem_mb": None, "rel_err": None, "error": "RuntimeError: x"})
    path.write_text(json.dumps({"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "cudnn": 91000,
                                "date": "2026-01-01", "rows": rows}))
    return path


def test_report_markdown(tmp_path):
    data = report.load(str(_synthetic(tmp_path / "e2e.json")))
    md = report.to_markdown(data)
    line = next(x for x in md.splitlines() if x.startswith("| dla34 | float16 | 256 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-4:-1] == ["ours auto", "2.00", "1.33"]  # best ours, x timm eager, x torch_compile
    assert "err[1]" in md and "RuntimeError: x" in md
    assert md.index("| dla34 |") < md.index("| dla60 |")
    with pytest.raises(ValueError):
        report.load(str(_write(tmp_path / "bad.json", {"rows": [{"model": "dla34"}]})))


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_report_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'dla_fast[bench]')")
    src = _synthetic(tmp_path / "e2e.json")
    png, md = tmp_path / "e2e.png", tmp_path / "e2e.md"
    assert report.main([str(src), "--md", str(md), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert md.read_text().startswith("## End-to-end inference")


def test_report_merges_runs_of_one_setting(tmp_path):
    head = {"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "cudnn": 91000, "cudnn_benchmark": True,
            "mode": "train"}
    row = {"dtype": "bfloat16", "batch_size": 256, "mode": "train", "hw": [224, 224], "img_per_s": 10.0}
    a = _write(tmp_path / "a.json", {**head, "date": "2026-01-01", "rows": [
        {**row, "model": "dla34", "impl": "timm_eager"}, {**row, "model": "dla34", "impl": "torch_compile"}]})
    b = _write(tmp_path / "b.json", {**head, "date": "2026-01-02", "rows": [{**row, "model": "dla102",
                                                                            "impl": "timm_eager"}]})
    out = tmp_path / "m" / "merged.json"
    assert report.main([str(a), str(b), "--merge", str(out)]) == 0
    m = json.loads(out.read_text())
    assert [(r["model"], r["impl"]) for r in m["rows"]] == [("dla34", "timm_eager"), ("dla34", "torch_compile"),
                                                           ("dla102", "timm_eager")]
    assert m["sources"] == ["a.json", "b.json"] and m["date"] == "2026-01-01..2026-01-02"
    assert m["cudnn_benchmark"] is True and m["device"] == "NVIDIA H100"
    # Rows measured another way are not one result; a row twice is an error, not a silent pick.
    c = _write(tmp_path / "c.json", {**head, "cudnn_benchmark": False, "date": "2026-01-02", "rows": [
        {**row, "model": "dla60", "impl": "timm_eager"}]})
    with pytest.raises(ValueError, match="cudnn_benchmark is False"):
        report.merge([report.load(str(a)), report.load(str(c))], [str(a), str(c)])
    with pytest.raises(ValueError, match="also in"):
        report.merge([report.load(str(a)), report.load(str(a))], ["a.json", "a2.json"])
    with pytest.raises(SystemExit):
        report.main([str(a), str(c), "--merge", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------------------ developer tools

def test_triton_compile_check_help():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "triton_compile_check.py"), "--help"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "--arch" in p.stdout and "--sass" in p.stdout and "--match" in p.stdout


def _run_without_interpreter(prog: str) -> subprocess.CompletedProcess:
    """``prog`` in its own process with TRITON_INTERPRET off (the kernels must be defined compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=600, env=env,
                          cwd=ROOT)


def test_no_two_written_kernel_arguments_alias():
    """Every Triton launcher (inference, training, the front) on DLA shapes: no two arguments that torch's TTIR
    analysis says a kernel may write are one tensor, and no kernel counts its input or weights as written.
    torch.compile clones each written argument around a traced launch and copies the clones back: a pair came
    back stale (the statistics conv's unused prologue pointers were its workspace: wrong batch statistics), and
    inputs counted as written were copied at every conv (the tile body's results once carried the store
    addresses, and the analysis follows a call's results back to all of its arguments). The check must catch
    two written arguments on one tensor."""
    pytest.importorskip("triton")
    tools = os.path.join(ROOT, "tools")
    p = _run_without_interpreter(
        "import runpy, sys\n"
        "sys.argv = ['tcc', '--aliasing', '--models', 'dla34', 'dla60x_c', '--dtype', 'float16,bfloat16', "
        "'--batch', '2', '--hw', '64']\n"
        f"runpy.run_path({os.path.join(tools, 'triton_compile_check.py')!r}, run_name='__main__')")
    if "TTIR" in p.stderr and p.returncode != 0 and "FAIL" not in p.stdout:  # pragma: no cover
        pytest.skip(f"this triton cannot generate sm_90 TTIR here: {p.stderr[-300:]}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"\b\d{2,} kernel specialisations .* checked for aliased written arguments .*: 0 failures",
                     p.stdout), p.stdout[-500:]
    assert "_conv_stats_kernel" in p.stdout and "_bn_bwd_apply_kernel" in p.stdout
    writes = re.findall(r"^ok .* (_\w+_kernel): writes \[(.*)\]$", p.stdout, re.M)
    assert len(writes) > 50
    assert not [(k, w) for k, w in writes if "'x_ptr'" in w or "'w_ptr'" in w], writes
    bad = _run_without_interpreter("\n".join([
        "import sys, torch", f"sys.path.insert(0, {tools!r})", "import triton_compile_check as tcc",
        "from dla_fast.backends.triton import _launch, _train",
        "rec = tcc._Recorder()", "_launch.wrap_triton = rec",
        "x = torch.empty(2, 16, 8, 8, device='meta', dtype=torch.float16)",
        "w = torch.empty(16, 16, 3, 3, device='meta', dtype=torch.float16)",
        "_train.conv_stats_launch(x, w, (1, 1), (1, 1), 1)",
        "k, a, kw = rec.calls[0]",
        "a = list(a); a[4] = a[3]  # pm2 is psum",
        "sys.exit(tcc._alias_report('psum=pm2', k, a, kw, 90))"]))
    assert bad.returncode == 1 and "FAIL psum=pm2 _conv_stats_kernel" in bad.stdout, \
        bad.stdout[-2000:] + bad.stderr[-2000:]


def test_triton_compile_check_records_every_front_config(monkeypatch):
    """--front runs the front's launcher on meta tensors for each candidate config and hands every launch to the
    compiler (here a recorder: compiling needs ptxas and takes seconds a kernel)."""
    import argparse
    import importlib.util

    # Imported first: the tool drops TRITON_INTERPRET as it is imported, and a kernel module imported without it
    # would define compiled kernels for the interpreter tests after this one. The variable is restored after.
    from dla_fast.backends.triton import _front, _launch
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    spec = importlib.util.spec_from_file_location("tcc", os.path.join(ROOT, "tools", "triton_compile_check.py"))
    tcc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tcc)

    got = []
    monkeypatch.setattr(tcc, "_report", lambda label, kernel, a, kw, args, seen: got.append((label, kernel, kw)) or 0)
    rec = tcc._Recorder()
    monkeypatch.setattr(_launch, "wrap_triton", rec)
    monkeypatch.setattr(_front, "_sm_count", _front._sm_count)  # the tool sets its own SM count; put it back after
    # The interpreter's kernels launch directly; as compiled ones they go through the recorder
    monkeypatch.setattr(_launch, "interpreted", lambda: False)
    monkeypatch.setattr(_front, "interpreted", lambda: False)
    args = argparse.Namespace(hw="64", batch=2, sms=132, arch=90, sass=False)
    assert tcc._front_check(args, [torch.float16], rec, set()) == 0
    want = _front.candidates(torch.float16, True, 132)
    assert [g[0] for g in got] == [f"{_front.describe(t)} float16 tf32=True" for t in want]
    assert all(getattr(k, "__name__", str(k)).endswith("_front_kernel") or "front" in str(k) for _, k, _ in got)
    assert [(kw["TH"], kw["TW"], kw["num_warps"]) for _, _, kw in got] == [(t[0], t[1], t[4]) for t in want]


@pytest.mark.interpreter
def test_opbench_train_cpu(tmp_path, capsys):
    """--train under the CPU interpreter (nothing timed): a residual conv, level 1's thin stride-2 conv and an
    aggregation root of dla34, each training kernel called (the shared input's data gradient on the conv, whose
    input a basic block shares; the thin conv's weight gradient), the statistics conv's output and mean and those
    gradients checked, the minimum bytes of each kernel."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    js = tmp_path / "t.json"
    argv = ["--train", "--device", "cpu", "--models", "dla34", "--hw", "32", "--dtypes", "float32", "--timer",
            "none", "--match", r"^(conv 64->64 k3x3 @8x8 \+res|agg 64\+64->64 @8x8|conv 16->32 k3x3 s2 @32x32)$",
            "--json", str(js)]
    assert opbench.main(argv) == 0
    data = json.loads(js.read_text())
    assert data["timer"] == "none" and data["batch"] == 2 and data["hw"] == [32, 32]
    rows = data["rows"]
    assert sorted({r["label"] for r in rows}) == ["agg 64+64->64 @8x8", "conv 16->32 k3x3 s2 @32x32",
                                                  "conv 64->64 k3x3 @8x8 +res"]
    impls = {label: [r["impl"] for r in rows if r["label"] == label] for label in {r["label"] for r in rows}}
    # on the CPU the CUDA extension's data-gradient rows are absent
    assert impls["conv 64->64 k3x3 @8x8 +res"] == [i for i in opbench.TRAIN_IMPLS
                                                   if not i.startswith("wgrad") and not i.endswith("_cuda")]
    assert impls["conv 16->32 k3x3 s2 @32x32"] == [i for i in opbench.TRAIN_IMPLS if not i.startswith("dgrad")]
    assert impls["agg 64+64->64 @8x8"] == [i for i in opbench.TRAIN_IMPLS if not i.startswith(("dgrad", "wgrad"))]
    for r in rows:
        assert r["ms"] is None and r["tbps"] is None
        if r["impl"] == "stats":
            assert r["rel_err"] < 1e-5 and r["mean_err"] < 1e-5
        if r["impl"] in ("dgrad", "wgrad"):
            assert r["rel_err"] < 1e-5, r
    out = 2 * 64 * 8 * 8 * 4  # bytes of one 64-channel 8x8 fp32 activation at batch 2
    by = {(r["label"], r["impl"]): r["min_bytes"] for r in rows}
    assert by[("conv 64->64 k3x3 @8x8 +res", "bn_act")] == 3 * out  # z, the residual, y
    assert by[("conv 64->64 k3x3 @8x8 +res", "bn_bwd")] == 8 * out
    assert by[("agg 64+64->64 @8x8", "stats")] == 3 * out  # two children in, z out
    assert by[("conv 64->64 k3x3 @8x8 +res", "dgrad")] == 3 * out  # dz and the other gradient in, dx out
    # level 1: its 16-channel 32x32 input and its 32-channel 16x16 dz read
    assert by[("conv 16->32 k3x3 s2 @32x32", "wgrad")] == 2 * 4 * (16 * 32 * 32 + 32 * 16 * 16)
    assert "stats-conv" in capsys.readouterr().out


def test_opbench_train_cli_errors(capsys, monkeypatch):
    for argv, msg in [(["--train", "--front"], "separate modes"),
                      (["--train", "--impls", "cuda"], "fixed set of kernels: drop --impls")]:
        with pytest.raises(SystemExit):
            opbench.main(["--device", "cpu"] + argv)
        assert msg in capsys.readouterr().err, argv
    monkeypatch.setattr(opbench._backends, "reason_unavailable", lambda name, t: "no Triton here")
    with pytest.raises(SystemExit):
        opbench.main(["--device", "cpu", "--train"])
    assert "Triton training kernels, which cannot run here: no Triton here" in capsys.readouterr().err


def test_train_tile_candidates_fit_the_layer():
    """--train --tiles: each dense ungrouped conv and aggregation-node shape starts from the training step's own
    plan, then only candidates that suit it (_train.tile_fits), each once, transposed exactly where the step would
    transpose it; the thin and grouped convs have none."""
    from dla_fast.backends.triton import _launch, _train
    bf16 = torch.bfloat16
    one = OpShape("conv_bn_act", (128,), (56, 56), 64)
    base, cands = opbench.train_tile_configs(one, 256, bf16)
    assert base == _train.train_conv_plan(256 * 56 * 56, 128, 64, 1, 1, 1, bf16, False)
    keys = [opbench._tile_key(c) for c in cands]
    assert opbench._tile_key(base) not in keys and len(set(keys)) == len(keys) and keys
    assert all(c["BLOCK_N"] <= 64 and c["BLOCK_K"] <= 128 for c in cands)
    assert all(c["SWAP"] == _train.stats_swap("dense", c["BLOCK_N"], False) for c in cands)
    assert set(keys) <= set(opbench.TRAIN_TILES)
    agg = OpShape("aggregate", (256, 256), (14, 14), 256, residual="child0")
    base, cands = opbench.train_tile_configs(agg, 256, bf16)
    want = _launch.aggregate_plan(256 * 14 * 14, [256, 256], 256, bf16, _launch.interpreted(), False, 0)
    assert {k: base[k] for k in want} == want and cands
    assert opbench.train_tile_configs(OpShape("conv_bn_act", (3,), (224, 224), 16, (7, 7), padding=(3, 3)),
                                      256, bf16) == (None, [])
    assert opbench.train_tile_configs(OpShape("conv_bn_act", (128,), (56, 56), 128, (3, 3), padding=(1, 1),
                                              groups=32), 256, bf16) == (None, [])
    narrow = opbench.train_tile_configs(OpShape("conv_bn_act", (48,), (56, 56), 64), 256, bf16,
                                        tiles=[(64, 128, 32, 8, 3), (64, 64, 64, 4, 3), (64, 64, 32, 4, 3)])[1]
    # 128 output channels for a 64-channel layer; a 64-deep K tile on 48 input channels
    assert [opbench._tile_key(c) for c in narrow] in ([(64, 64, 32, 4, 3)], [])
    assert _train.tile_fits(64, 32, 48, 64) and not _train.tile_fits(64, 64, 48, 64)
    assert not _train.tile_fits(128, 32, 48, 64) and _train.tile_fits(16, 16, 3, 3)


def test_train_tiles_summary_sums_layers_per_model():
    """The per-model summary: each shape's time times its layer count, at the defaults, at each shape's fastest
    config, and with one config per class chosen by the class's sum (a shape where that config did not run keeps
    its default); configs that failed or disagreed with the default's output count nowhere; the environment
    setting that selects the per-class choice, per kernel family."""
    def row(shape, cls, layers, cfg, ms, default=False, err=0.0, error=None, kernel="stats"):
        return {"shape_id": shape, "label": shape, "kernel": kernel, "class": cls, "layers": layers,
                "dtype": "bfloat16", "default": default, "ms": ms, "rel_err": err, "error": error,
                "config": list(cfg)}
    a, b, c = (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 3)
    rows = [row("s1", "1x1", {"m": 2}, a, 1.0, default=True), row("s1", "1x1", {"m": 2}, b, 0.5),
            row("s1", "1x1", {"m": 2}, c, 0.1, err=0.5),  # wrong: never chosen
            row("s2", "1x1", {"m": 1, "n": 1}, a, 2.0, default=True), row("s2", "1x1", {"m": 1, "n": 1}, c, 1.0),
            row("s3", "kxk", {"m": 3}, c, 4.0, default=True), row("s3", "kxk", {"m": 3}, a, None, error="oom"),
            row("s1", "all", {"m": 2}, (2048, 4, 64), 3.0, default=True, kernel="bn"),
            row("s1", "all", {"m": 2}, (4096, 8, 64), 2.0, kernel="bn"),
            row("s3", "all", {"m": 3}, (2048, 4, 64), 1.0, default=True, kernel="bn"),
            row("s3", "all", {"m": 3}, (4096, 8, 64), 1.5, kernel="bn")]
    stats, bn = opbench.train_tiles_summary(rows, ["m"])
    assert stats["kernel"] == "stats" and stats["default_ms"] == 2 * 1.0 + 2.0 + 3 * 4.0
    assert stats["best_ms"] == 2 * 0.5 + 1.0 + 3 * 4.0
    # 1x1: b costs 2*0.5 + 2.0 (s2 keeps its default) = 3.0, c costs 2*1.0 + 1.0 = 3.0 (s1's c was wrong: s1 keeps
    # its default), a 4.0; a tie goes to the first config in sorted order (b)
    assert stats["per_class_ms"] == 3.0 + 3 * 4.0 and stats["per_class"] == {"1x1": list(b), "kxk": list(c)}
    assert stats["env"] == "DLA_FAST_TRAIN_TILES='1x1=64,128,64,4,4;kxk=128,64,64,4,3'" and stats["shapes"] == 3
    assert bn["kernel"] == "bn" and bn["default_ms"] == 2 * 3.0 + 3 * 1.0 and bn["best_ms"] == 2 * 2.0 + 3 * 1.0
    # one config for all: the default 9.0 against 4096's 2*2.0 + 3*1.5 = 8.5
    assert bn["per_class_ms"] == 8.5 and bn["env"] == "DLA_FAST_TRAIN_ELTWISE=4096,8,64"
    (n,) = opbench.train_tiles_summary(rows, ["n"])
    assert n["default_ms"] == 2.0 and n["best_ms"] == 1.0


@pytest.mark.interpreter
def test_opbench_train_tiles_cpu(tmp_path, capsys, monkeypatch):
    """--train --tiles under the CPU interpreter with a fake timer: each selected dense conv and aggregation node's
    statistics conv at its default and every suitable candidate, each shape's BN kernels at each elementwise
    candidate, every output checked against the default's, the per-model summary printed and written."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    from dla_fast.backends.triton import _train
    monkeypatch.setattr(opbench, "TRAIN_TILES", ((16, 32, 16, 4, 1), (32, 16, 16, 4, 1), (16, 64, 32, 4, 1)))
    base = _train.eltwise_config()  # the default config, the first candidate
    monkeypatch.setattr(opbench, "TRAIN_ELTWISE", (base, (512, 2, 16)))
    seen, calls = [], []
    tiles = _train._eltwise_tiles

    def spy(C):  # the config the launchers see
        seen.append(_train.eltwise_config())
        return tiles(C)
    monkeypatch.setattr(_train, "_eltwise_tiles", spy)

    def fake_time(fn, *a, **k):
        fn()
        calls.append(fn)
        return 1e-3 * len(calls)
    monkeypatch.setattr(opbench, "time_ms", fake_time)
    js = tmp_path / "t.json"
    argv = ["--train", "--tiles", "--device", "cpu", "--models", "dla34", "--hw", "32", "--dtypes", "float32",
            "--match", r"^(conv 64->64 k3x3 @8x8 \+res|agg 64\+64->64 @8x8|conv 16->32 k3x3 s2 @32x32)$",
            "--json", str(js)]
    assert opbench.main(argv) == 0
    data = json.loads(js.read_text())
    rows = data["rows"]
    assert all(r["error"] is None and r["rel_err"] < 1e-5 and r["ms"] is not None for r in rows), rows
    stats = {r["label"] for r in rows if r["kernel"] == "stats"}
    assert stats == {"conv 64->64 k3x3 @8x8 +res", "agg 64+64->64 @8x8", "conv 16->32 k3x3 s2 @32x32"}
    for label in stats - {"conv 16->32 k3x3 s2 @32x32"}:
        mine = [r for r in rows if r["label"] == label and r["kernel"] == "stats"]
        assert [r["default"] for r in mine] == [True, False, False, False]
        assert {tuple(r["config"][:2]) for r in mine[1:]} == {(16, 32), (32, 16), (16, 64)}
    bn = [r for r in rows if r["kernel"] == "bn"]
    assert len(bn) == 6 and {r["label"] for r in bn} == stats
    # level 1 (16 -> 32): not the candidate with a 32-deep K tile and 64-wide N tile
    assert [tuple(r["config"][:3]) for r in rows if r["kernel"] == "stats" and r["label"].startswith("conv 16")][1:] \
        == [(16, 32, 16), (32, 16, 16)]
    assert [tuple(r["config"]) for r in bn[:2]] == [base, (512, 2, 16)]
    assert (512, 2, 16) in seen and _train.eltwise_config() == base  # restored after each call
    assert {(s["kernel"], s["shapes"]) for s in data["summary"]} == {("stats", 3), ("bn", 3)}
    assert "DLA_FAST_TRAIN_ELTWISE=" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        opbench.main(["--device", "cpu", "--tiles"])
    assert "give it with --train" in capsys.readouterr().err


def test_training_tile_class_rule(monkeypatch):
    """Without DLA_FAST_TRAIN_TILES the statistics conv's tile follows its class where the inference plan is
    128x128x64 on 8 warps: 1x1 convs on 4 warps; k x k convs and aggregation nodes over >= WIDE_AGG_MIN_K input
    channels on 256-row tiles while those make WIDE_MIN_PROGRAMS programs; any other plan is kept; the
    override, where it suits the layer, wins over the rule."""
    from dla_fast import _env
    from dla_fast.backends.triton import _train
    plan = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, SPLIT=1)

    def tiles(cls, M, cin, cout, k_total=0, cfg=plan):
        c = dict(cfg)
        _train.train_class_tiles(c, cls, M, cin, cout, k_total)
        return opbench._tile_key(c)
    base = opbench._tile_key(plan)
    assert tiles("1x1", 256 * 56 * 56, 128, 128) == _train.TILE_1X1
    assert tiles("kxk", 256 * 28 * 28, 128, 128) == _train.TILE_WIDE  # 784 programs
    assert tiles("kxk", 256 * 7 * 7, 512, 512) == base  # 49 x 4 = 196 programs: a half-empty last wave
    assert tiles("kxk", 256 * 14 * 14, 256, 512) == _train.TILE_WIDE  # 196 x 4 = 784 programs
    assert tiles("agg", 256 * 28 * 28, 256, 256, k_total=512) == base  # a short K walk keeps 128 rows
    assert tiles("agg", 256 * 28 * 28, 128, 256, k_total=896) == _train.TILE_WIDE
    narrow = dict(plan, BLOCK_N=64, num_warps=4)
    assert tiles("1x1", 256 * 56 * 56, 128, 64, cfg=narrow) == opbench._tile_key(narrow)
    assert all(_train.tile_fits(t[1], t[2], 128, 128) for t in (_train.TILE_1X1, _train.TILE_WIDE))
    monkeypatch.setenv("DLA_FAST_TRAIN_TILES", "kxk=64,64,32,4,5")
    _env.reload()
    try:
        assert tiles("kxk", 256 * 7 * 7, 512, 512) == (64, 64, 32, 4, 5)
        assert tiles("1x1", 256 * 56 * 56, 128, 128) == _train.TILE_1X1  # a class left out keeps the rule
    finally:
        monkeypatch.delenv("DLA_FAST_TRAIN_TILES")
        _env.reload()


def test_training_tile_overrides(monkeypatch):
    """DLA_FAST_TRAIN_TILES and DLA_FAST_TRAIN_ELTWISE: parsed once with errors that name the value and the
    format; a class's tile replaces the plan on the dense ungrouped convs without the BN prologue that it suits,
    the others keep their plan; the elementwise setting reaches the kernels' tiles."""
    from dla_fast import _env
    from dla_fast.backends.triton import _train
    bf16 = torch.bfloat16

    def plan(cin, cout, k, norm=False, groups=1):
        return _train.train_conv_plan(256 * 56 * 56, cin // groups, cout // groups, groups, k, k, bf16, False,
                                      norm=norm)
    before = {k: plan(*k) for k in [(128, 64, 1), (64, 64, 3), (16, 64, 1)]}
    monkeypatch.setenv("DLA_FAST_TRAIN_TILES", "1x1=64,64,32,4,5; kxk=256,64,64,8,3")
    monkeypatch.setenv("DLA_FAST_TRAIN_ELTWISE", "4096,8,128")
    _env.reload()
    try:
        assert _train.train_tile_overrides() == {"1x1": (64, 64, 32, 4, 5), "kxk": (256, 64, 64, 8, 3)}
        p = plan(128, 64, 1)
        assert opbench._tile_key(p) == (64, 64, 32, 4, 5) and p["SWAP"] == _train.stats_swap("dense", 64, False)
        assert opbench._tile_key(plan(64, 64, 3)) == (256, 64, 64, 8, 3)
        assert plan(16, 64, 1) == before[(16, 64, 1)]  # a 32-deep K tile does not suit 16 input channels
        assert plan(64, 64, 3, norm=True) == _train.train_conv_plan(256 * 56 * 56, 64, 64, 1, 3, 3, bf16, False,
                                                                    norm=True)  # the prologue conv keeps its plan
        assert _train.eltwise_config() == (4096, 8, 128)
        bm, bc, warps = _train._eltwise_tiles(256)
        assert (bc, warps) == (128, 8) and bm == (32 if _train.interpreted() else 4096 // 128)
        assert _train._eltwise_tiles(32)[1:] == (32, 8)
        for name, bad, msg in [("DLA_FAST_TRAIN_TILES", "3x3=64,64,32,4,3", "class '3x3'"),
                               ("DLA_FAST_TRAIN_TILES", "1x1=64,64,32,4,3;1x1=64,64,32,4,3", "again"),
                               ("DLA_FAST_TRAIN_TILES", "1x1=64,64,24,4,3", "powers of two"),
                               ("DLA_FAST_TRAIN_TILES", "agg=64,64,32,4", "1 to 8 stages"),
                               ("DLA_FAST_TRAIN_ELTWISE", "4096,8", "ELEMENTS,WARPS,CHANNELS"),
                               ("DLA_FAST_TRAIN_ELTWISE", "4096,32,64", "at most 16 warps")]:
            monkeypatch.setenv(name, bad)
            _env.reload()
            with pytest.raises(ValueError, match=msg):
                _train.train_tile_overrides() if name.endswith("TILES") else _train.eltwise_config()
            monkeypatch.delenv(name)
    finally:
        monkeypatch.delenv("DLA_FAST_TRAIN_TILES", raising=False)
        monkeypatch.delenv("DLA_FAST_TRAIN_ELTWISE", raising=False)
        _env.reload()
    assert {k: plan(*k) for k in before} == before


def test_profile_model_train_classes_and_errors(capsys):
    """profile_model.py --train: kernel names of a training step (ours, Inductor's, cuDNN's, cuBLAS's, ATen's)
    land in their classes, and an implementation it cannot profile is refused before anything runs."""
    import profile_model
    kc = profile_model.kernel_class
    assert kc("_conv_stats_kernel") == "statistics conv (triton)"
    assert kc("_bn_bwd_reduce_kernel") == "BN backward reduce (triton)"
    assert kc("_max_pool_bwd_kernel") == "max pool (triton)"
    assert kc("_conv_gemm_kernel") == "shared dgrad (triton)"  # not a cuBLAS gemm
    assert kc("triton_poi_fused_max_pool2d_with_indices_3") == "inductor fused (triton)"
    assert kc("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "conv dgrad"
    assert kc("sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32") == "conv wgrad"
    assert kc("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16>") == "conv forward"
    assert kc("nvjet_sm90_tst_128x64_64x8_1x2_h_bz_splitK_NTT") == "gemm (1x1 convs, fc)"
    assert kc("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>") == (
        "adds (aten)")
    assert kc("something else") == "other"
    for impl in ("nope", "dla_fast_fused_graph", ""):
        with pytest.raises(SystemExit):
            profile_model.main(["--train", impl])
        assert "unknown or captured" in capsys.readouterr().err, impl


def test_profile_model_host_rows_and_arguments(capsys):
    """profile_model.py --host: a torch.profiler CPU table becomes per-forward rows by own time; --train takes
    neither HxW sizes nor --features, nor --host; a size that is neither N nor HxW is refused before anything runs."""
    import types

    import profile_model
    ev = [types.SimpleNamespace(key="aten::empty", count=40, self_cpu_time_total=80.0, cpu_time_total=80.0),
          types.SimpleNamespace(key="dla_fast::conv_bn_act", count=20, self_cpu_time_total=400.0,
                                cpu_time_total=600.0)]
    rows = profile_model.host_rows(ev, 4)
    assert [r["op"] for r in rows] == ["dla_fast::conv_bn_act", "aten::empty"]
    assert rows[0] == {"op": "dla_fast::conv_bn_act", "calls": 5.0, "self_us": 100.0, "total_us": 150.0,
                       "self_us_per_call": 20.0}
    for argv, msg in ((["--hw", "512x512", "--train", "dla_fast_fused"], "square --hw N"),
                      (["--host", "--hw", "512y640"], "--hw: "),
                      (["--features", "--train", "dla_fast_fused"], "square --hw N"),
                      (["--host", "--train", "dla_fast_fused"], "separate modes")):
        with pytest.raises(SystemExit):
            profile_model.main(argv)
        assert msg in capsys.readouterr().err, argv


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_profile_model_host_cuda(tmp_path, capsys):
    """profile_model.py --host on a GPU: a dla34 features call at 2 x 64x96 on the CUDA backend; its issue time,
    its launches and the extension's op among the recorded ops."""
    import profile_model
    js = tmp_path / "h.json"
    assert profile_model.main(["--host", "--model", "dla34", "--features", "--hw", "64x96", "--batch", "2",
                               "--backend", "cuda", "--iters", "3", "--json", str(js)]) == 0
    run = json.loads(js.read_text())
    assert run["issue_ms"] > 0 and run["launches"] > 10 and run["hw"] == [64, 96]
    assert any(r["op"] == "dla_fast::conv_bn_act" and r["calls"] > 10 for r in run["ops"])
    assert "host time to issue one forward" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_opbench_train_cuda(tmp_path):
    """--train on a GPU: two dla34 shapes at batch 8, bf16, timed from graph replays; every kernel a positive
    time, the statistics conv checked against cuDNN's conv."""
    js = tmp_path / "t.json"
    argv = ["--train", "--models", "dla34", "--batch", "8", "--dtypes", "bfloat16", "--warmup", "5", "--rep", "10",
            "--match", r"^(conv 64->64 k3x3 @56x56 \+res|agg 64\+64->64 @56x56)$", "--json", str(js)]
    assert opbench.main(argv) == 0
    data = json.loads(js.read_text())
    # neither shape is thin (no wgrad), the root has no shared input (no dgrad)
    conv_rows = [i for i in opbench.TRAIN_IMPLS if not i.startswith("wgrad")]
    agg_rows = [i for i in conv_rows if not i.startswith("dgrad")]
    assert data["timer"] == "cudagraph" and len(data["rows"]) == len(conv_rows) + len(agg_rows)
    assert all(r["ms"] > 0 and r["tbps"] > 0 for r in data["rows"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_profile_model_train_cuda(tmp_path, capsys):
    """profile_model.py --train on a GPU: one fused dla34 step at batch 8, 64x64; its kernels include the
    statistics convs and BN backward, and the classes add up to the step's kernel time."""
    import profile_model
    js = tmp_path / "p.json"
    assert profile_model.main(["--model", "dla34", "--dtype", "bfloat16", "--batch", "8", "--hw", "64", "--iters",
                               "2", "--train", "dla_fast_fused", "--json", str(js)]) == 0
    run = json.loads(js.read_text())["impls"]["dla_fast_fused"]
    assert run["classes"]["statistics conv (triton)"]["ms"] > 0 and run["classes"]["BN backward reduce (triton)"]
    assert sum(c["ms"] for c in run["classes"].values()) == pytest.approx(run["kernel_ms"], rel=1e-6)
    assert "top kernels, dla_fast_fused:" in capsys.readouterr().out


def test_opbench_train_interrupted_keeps_rows(tmp_path, monkeypatch):
    """--train stopped part-way (SIGTERM at a device call's deadline arrives as KeyboardInterrupt): the rows
    measured so far are written, marked interrupted, and the exit status is 130."""
    js = tmp_path / "t.json"

    def fake_run(*args, into=None, **kw):
        into.update({"batch": 2, "rows": [{"impl": "stats", "ms": 1.0}]})
        raise KeyboardInterrupt
    monkeypatch.setattr(opbench, "train_run", fake_run)
    monkeypatch.setattr(opbench._backends, "reason_unavailable", lambda name, t: None)
    assert opbench.main(["--train", "--device", "cpu", "--models", "dla34", "--json", str(js)]) == 130
    data = json.loads(js.read_text())
    assert data["interrupted"] is True and data["rows"] == [{"impl": "stats", "ms": 1.0}]
    # --tiles: the summary of the shapes measured so far is written and printed too
    row = {"shape_id": "s", "label": "s", "kernel": "bn", "class": "all", "layers": {"dla34": 2},
           "dtype": "bfloat16", "default": True, "ms": 1.5, "rel_err": 0.0, "error": None, "config": [2048, 4, 64]}

    def fake_tiles(*args, into=None, **kw):
        into.update({"batch": 2, "rows": [row]})
        raise KeyboardInterrupt
    monkeypatch.setattr(opbench, "train_tiles_run", fake_tiles)
    assert opbench.main(["--train", "--tiles", "--device", "cpu", "--models", "dla34", "--json", str(js)]) == 130
    (summ,) = json.loads(js.read_text())["summary"]
    assert summ["default_ms"] == 3.0 and summ["env"] == "DLA_FAST_TRAIN_ELTWISE=2048,4,64"


# ------------------------------------------------------------------------------------------ ab.py


def test_ab_summary():
    """Per (model, dtype, batch, impl): the arms' figures in run order, medians, B / A; distributed rows give rank
    0 alone; an arm's error row is kept as an error, not a figure."""
    def row(impl, v, **kw):
        return {"model": "dla34", "dtype": "bfloat16", "batch_size": 256, "impl": impl, **kw,
                **({"img_per_s": v} if v is not None else {})}
    arms = [{"arm": "A", "rows": [row("x", 100.0, peak_mem_mb=10), row("g", None, single_img_per_s=50.0)]},
            {"arm": "B", "rows": [row("x", 110.0, peak_mem_mb=9), row("g", None, single_img_per_s=60.0)]},
            {"arm": "A", "rows": [row("x", 102.0, peak_mem_mb=10), row("g", None, error="out of memory")]},
            {"arm": "B", "rows": [row("x", 112.0, peak_mem_mb=9), row("g", None, single_img_per_s=62.0)]}]
    by = {s["impl"]: s for s in ab.summarize(arms)}
    assert by["x"]["A"] == [100.0, 102.0] and by["x"]["B"] == [110.0, 112.0]
    assert by["x"]["median_A"] == 101.0 and by["x"]["b_over_a"] == round(111.0 / 101.0, 4)
    assert (by["x"]["peak_mb_A"], by["x"]["peak_mb_B"]) == (10, 9)
    assert by["g"]["A"] == [50.0] and by["g"]["B"] == [60.0, 62.0] and by["g"]["errors"] == ["A: out of memory"]
    table = ab.format_table(ab.summarize(arms))
    assert "| dla34 | bfloat16 | 256 | x | 100.0 102.0 | 110.0 112.0 | 101.0 | 111.0 | 1.099 | 10 / 9 |" in table


def test_ab_runs_two_settings_alternately(tmp_path):
    """Two environment settings, each arm its own process, A B A B; the arms' rows and the summary in --json."""
    out = tmp_path / "ab.json"
    p = subprocess.run([sys.executable, os.path.join(_BENCH, "ab.py"), "--a", "DLA_FAST_FRONT=0", "--b",
                        "DLA_FAST_FRONT=1", "--json", str(out), "--", "--device", "cpu", "--model", "dla46_c", "--hw",
                        "32", "--batch-size", "1", "--rounds", "1", "--iters", "1", "--warmup", "0", "--impl",
                        "dla_fast_eager"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert [(x["arm"], x["round"], x["rc"]) for x in r["arms"]] == [("A", 1, 0), ("B", 1, 0), ("A", 2, 0), ("B", 2, 0)]
    assert [x["env"] for x in r["arms"][:2]] == [{"DLA_FAST_FRONT": "0"}, {"DLA_FAST_FRONT": "1"}]
    (s,) = r["summary"]
    assert s["impl"] == "dla_fast_eager" and len(s["A"]) == len(s["B"]) == 2 and s["b_over_a"] > 0
    assert p.stdout.startswith("| model | dtype | batch | impl | A img/s")


@pytest.mark.parametrize("args,message", [
    (["--a", "X=1", "--b", "X=2"], "give the bench arguments after '--'"),
    (["--a", "X=1", "--b", "X=1", "--", "--model", "dla34"], "the two arms are the same"),
    (["--a", "X", "--b", "X=2", "--", "--model", "dla34"], "--a takes VAR=value settings"),
    (["--a", "X=1", "--b", "X=2", "--", "--json", "o.json"], "--json after '--' is ab.py's to set"),
    (["--a-dir", "/nonexistent", "--", "--model", "dla34"], "holds no dla_fast package"),
])
def test_ab_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit):
        ab.main(args)
    assert message in capsys.readouterr().err
