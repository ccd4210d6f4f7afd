"""CPU checks of the benchmark tooling in benchmarks/: shape extraction, the op timer, the report."""
import json
import math
import os
import sys

import pytest
import torch

import dla_fast

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

import opbench  # noqa: E402
import opbench_summary  # noqa: E402
import report  # noqa: E402
import shapes  # noqa: E402
from shapes import OpShape  # noqa: E402


def _find(entries, **kw):
    return [e for e in entries if all(getattr(e.shape, k) == v for k, v in kw.items())]


def test_dla34_shapes_come_from_the_model():
    entries = shapes.distinct_shapes(("dla34",), batch=8, hw=224)
    fused = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float32, backend="eager")
    n_fused = len(fused.fused_layers())
    assert sum(e.count for e in entries) == n_fused == len(shapes.layer_records("dla34", 224))
    assert sorted(l.split(":", 1)[1] for e in entries for l in e.layers) == sorted(n for n, _ in fused.fused_layers())
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


def test_shapes_follow_input_size_and_cli(capsys):
    entries = shapes.distinct_shapes("dla34", batch=2, hw=64)
    root5, = [e for e in entries if e.layers == ["dla34:level5.root"]]
    assert root5.shape.hw == (2, 2)
    assert shapes.OpShape.from_dict(root5.shape.to_dict()) == root5.shape
    assert shapes.main(["dla34", "--batch", "2", "--hw", "64"]) == 0
    out = capsys.readouterr().out
    assert "2x3x64x64" in out and "distinct shapes over 37 layers" in out


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
    js, md = tmp_path / "o.json", tmp_path / "o.md"
    # "cuda" cannot run on CPU tensors: the run records why and goes on (triton would too, but importing it
    # pulls in torch._inductor, seconds this test does not need). hw=64 reuses the shapes cached above.
    rc = opbench.main(["--device", "cpu", "--models", "dla34", "--batch", "1", "--hw", "64", "--limit", "2",
                       "--impls", "eager", "cuda", "cudnn_conv", "eager_seq",
                       "--warmup", "1", "--rep", "1", "--json", str(js), "--md", str(md)])
    assert rc == 0
    data = json.loads(js.read_text())
    for k in ("device", "torch", "triton", "cudnn", "date"):
        assert k in data
    assert len(data["shapes"]) == 2 and len(data["rows"]) == 2 * 4
    assert all(r.get("skipped") and r["ms"] is None for r in data["rows"] if r["impl"] == "cuda")
    assert all(r["ms"] > 0 for r in data["rows"] if r["impl"] != "cuda")
    text = md.read_text()
    assert "conv 3->16 k7x7 @64x64" in text and "| dla34 | 2/37 | float32 |" in text and "Skipped:" in text
    assert "[  2/2]" in capsys.readouterr().out


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


def test_opbench_timer_choice():
    """Small batches are timed by CUDA-graph replay (their launches outlast the kernels), large ones by
    do_bench; the CPU always by perf_counter."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert opbench.timer_name(cuda, "auto", 1) == "cudagraph"
    assert opbench.timer_name(cuda, "auto", opbench.SMALL_BATCH) == "cudagraph"
    assert opbench.timer_name(cuda, "auto", opbench.SMALL_BATCH + 1) in ("triton.testing.do_bench", "cuda_events")
    assert opbench.timer_name(cuda, "cudagraph", 256) == "cudagraph"
    assert opbench.timer_name(cuda, "do_bench", 1) != "cudagraph"
    assert opbench.timer_name(cpu, "cudagraph", 1) == "perf_counter"


def test_report_markdown(tmp_path):
    data = report.load(str(_synthetic(tmp_path / "e2e.json")))
    md = report.to_markdown(data)
    line = next(l for l in md.splitlines() if l.startswith("| dla34 | float16 | 256 |"))
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


def test_opbench_summary_counts_losses(tmp_path, capsys):
    def rows(ms):
        return [{"shape_id": s, "dtype": "float16", "impl": impl, "ms": t} for (s, impl), t in ms.items()]
    run = {"rows": rows({("a", "cuda"): 1.0, ("a", "eager_seq"): 2.0, ("a", "triton"): 0.5,
                         ("b", "cuda"): 3.0, ("b", "eager_seq"): 2.0, ("b", "triton"): 3.0})}
    ref = {"rows": rows({("a", "cuda"): 2.0, ("b", "cuda"): 3.0})}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    assert opbench_summary.main([str(tmp_path / "run.json"), "--ref", str(tmp_path / "ref.json")]) == 0
    out = capsys.readouterr().out
    assert "cuda: 1 of 2 rows beat eager_seq" in out
    assert f"geomean eager_seq/cuda {math.sqrt(2.0 * 2.0 / 3.0):.3f}" in out
    assert "triton faster on 1 of 2" in out
    assert f"geomean ref/cuda {math.sqrt(2.0):.3f} over 2 rows" in out
    assert "LOSE b float16: 3.0000 ms, eager_seq 2.0000 (0.667x)" in out and "LOSE a" not in out
    (tmp_path / "bad.json").write_text(json.dumps({"rows": rows({("a", "triton"): 1.0})}))
    assert opbench_summary.main([str(tmp_path / "bad.json")]) == 2
