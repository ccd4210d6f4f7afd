"""``python -m dla_fast``: bad arguments are refused before anything is measured, with a message that says what to
change; the commands run on the CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dla_fast", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))


@pytest.mark.parametrize("args,message", [
    (["bench", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["bench", "--batch-size", "-3"], "--batch-size must be >= 1, got -3"),
    (["bench", "--hw", "65"], "--hw 65: DLA runs only on sides of 32k-1 or 32k"),
    (["bench", "--hw", "0"], "--hw 0: DLA runs only on sides of 32k-1 or 32k"),
    (["bench", "--hw", "224x"], "--hw must be a side like 224 or HxW"),
    (["bench", "--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["bench", "--iters", "0"], "--iters must be >= 1, got 0"),
    (["bench", "--warmup", "-1"], "--warmup must be >= 0"),
    (["bench", "--dtype", ""], "--dtype names no dtype"),
    (["bench", "--dtype", "float8"], "unknown dtype(s) float8"),
    (["bench", "--model", ""], "--model names no model"),
    (["bench", "--model", "dla35"], "unknown model(s) dla35"),
    (["bench", "--impl", ""], "--impl names no implementation"),
    (["bench", "--impl", "tensorrt"], "unknown impl(s) tensorrt"),
    (["bench", "--json", "/proc/no/such/dir/x.json"], "cannot write --json"),
    (["verify", "--hw", "65", "--model", "dla34"], "--hw 65: DLA runs only on sides of 32k-1 or 32k"),
    (["verify", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["tune"], "tuning times kernels on a GPU"),
])
def test_bad_arguments_fail_fast_with_a_message(args, message):
    p = _cli(*args, timeout=120)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr, p.stderr


def test_bench_runs_on_the_cpu(tmp_path):
    out = tmp_path / "b.json"
    p = _cli("bench", "--model", "dla46_c", "--hw", "63x64", "--batch-size", "1", "--rounds", "1", "--iters", "1",
             "--warmup", "0", "--impl", "dla_fast_eager", "--json", str(out))
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["hw"] == [63, 64] and r["dla_fast"]
    (row,) = r["rows"]
    assert row["impl"] == "dla_fast_eager" and row["img_per_s"] > 0 and row["first_s"] >= 0 and row["rel_err"] < 1e-4
    assert "| dla46_c | float32 | 1 | dla_fast_eager |" in p.stdout
    # cuDNN picks its algorithms by timing them, as timm's train.py and benchmark.py have it, and the result says so
    assert r["cudnn_benchmark"] is True and " (benchmark on) |" in p.stdout
    # the host's load as the timed rounds began (Linux has a load average)
    assert isinstance(row["host_load"], float) and row["host_load"] >= 0


def test_bench_notes_a_busy_host(monkeypatch):
    """Rows timed while other processes load the CPU say so in the log and keep the load average."""
    import torch

    from dla_fast import bench

    assert not bench.busy_host(None, 16) and not bench.busy_host(0.9, 2) and not bench.busy_host(3.9, 16)
    assert bench.busy_host(1.5, 2) and bench.busy_host(4.5, 16)
    monkeypatch.setattr(bench, "host_load", lambda: 64.0)
    lines = []
    rows = bench.bench_one("dla46_c", torch.float32, 1, ["dla_fast_eager"], "cpu", (32, 32), 1, 1, 0, lines.append)
    assert rows[0].host_load == 64.0 and rows[0].ms > 0
    assert any("load average is 64.0" in s for s in lines), lines


def test_bench_leaves_the_callers_cudnn_setting(tmp_path, monkeypatch, capsys):
    """cli.main inside a user's process: the run sets cudnn.benchmark as asked and puts the caller's value back."""
    import torch

    from dla_fast import cli

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    out = tmp_path / "b.json"
    seen = []
    real_run = cli._bench

    def spy(a):
        seen.append(torch.backends.cudnn.benchmark)
        return real_run(a)
    monkeypatch.setattr(cli, "_bench", spy)
    args = ["bench", "--device", "cpu", "--model", "dla46_c", "--hw", "32", "--batch-size", "1", "--rounds", "1",
            "--iters", "1", "--warmup", "0", "--impl", "dla_fast_eager", "--json", str(out)]
    assert cli.main(args) == 0
    assert torch.backends.cudnn.benchmark is False and json.loads(out.read_text())["cudnn_benchmark"] is True
    torch.backends.cudnn.benchmark = True
    assert cli.main(args + ["--no-cudnn-benchmark"]) == 0
    assert torch.backends.cudnn.benchmark is True and json.loads(out.read_text())["cudnn_benchmark"] is False
    assert seen == [True, False]
    assert " (benchmark off) |" in capsys.readouterr().out


def test_bench_features_mode_on_the_cpu(tmp_path):
    p = _cli("bench", "--model", "dla34", "--features", "--hw", "64", "--batch-size", "1", "--rounds", "1",
             "--iters", "1", "--warmup", "0", "--impl", "dla_fast_eager", "--json", str(tmp_path / "f.json"))
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "f.json").read_text())
    assert r["features"] == [2, 3, 4, 5] and r["rows"][0]["rel_err"] < 1e-4 and r["rows"][0]["features"]


def test_bench_reports_the_tuning_time_apart(monkeypatch):
    """bench --tune: a tuned implementation's row keeps the tuning's seconds and its measured / cached layer calls,
    and the table prints them inside the first result's time (a GPU path: optimize and tune faked here)."""
    import torch

    import dla_fast
    from dla_fast import bench
    from dla_fast.plan import TuneReport
    real = dla_fast.optimize
    monkeypatch.setattr(dla_fast, "optimize", lambda m, dtype, **kw: real(m, dtype=dtype, backend="eager"))
    rep = TuneReport("H100", "float32", [(1, 64, 64)], layers=29, measured=20, reused=9, seconds=12.5)
    asked = []
    monkeypatch.setattr(dla_fast, "tune", lambda fast, hw, sizes, **kw: asked.append((tuple(hw), list(sizes))) or rep)
    got: dict = {}
    fn, used = bench.build_impl("dla_fast_auto", "dla34", dla_fast.create_model("dla34"), torch.float32, "cuda", 1,
                                (64, 64), tune=True, tuned=got)
    assert asked == [((64, 64), [1])] and used == "eager"
    assert got == {"seconds": 12.5, "measured": 20, "reused": 9, "regime": None, "call_ms": None}
    # a graph-replayed model (the runner wraps the tuned model) and a whole-call check in the report: its times
    from dla_fast.fuse import CudaGraphRunner
    rep.calls["call|dla34|float32|64x64|n1"] = {"regime": "cuda", "measured_ms": 2.0, "paced_ms": None,
                                                "cuda_ms": 1.5}
    monkeypatch.setattr(dla_fast, "optimize",
                        lambda m, dtype, **kw: CudaGraphRunner(real(m, dtype=dtype, backend="eager")))
    got = {}
    fn, used = bench.build_impl("dla_fast_cudagraph", "dla34", dla_fast.create_model("dla34"), torch.float32, "cuda",
                                1, (64, 64), tune=True, tuned=got)
    assert isinstance(fn, CudaGraphRunner) and used == "eager"
    assert got["call_ms"] == {"measured": 2.0, "paced": None, "cuda": 1.5} and got["regime"] is None
    row = dict(bench.Row("dla34", "float32", 1, "dla_fast_auto", img_per_s=100.0, ms=10.0, rel_err=1e-6,
                         first_s=14.2, tune_s=12.5, tune_measured=20, tune_reused=9).__dict__)
    table = bench.format_table({"device": "H100", "torch": "2", "triton": "3", "cudnn": 9, "date": "today",
                                "rows": [row]})
    assert "| 14.2 (tuning 12.5: 20 measured, 9 cached) |" in table


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_bench_tunes_a_detection_call_and_reports_its_host_time():
    """bench --features --tune on a GPU at 4 x 512x512: auto's row says which regime won the whole call, and every
    row has the host's time to issue one call beside the call's time."""
    from dla_fast import bench
    rows = bench.bench_one("dla34", torch.float16, 4, ["dla_fast_cuda", "dla_fast_auto"], "cuda", (512, 512),
                           rounds=3, iters=3, warmup=1, log=lambda s: None, features=True, tune=True)
    by = {r.impl: r for r in rows}
    assert all(r.error is None and r.ms > 0 and 0 < r.host_ms for r in rows)
    assert by["dla_fast_auto"].tune_regime in ("measured", "paced", "cuda") and by["dla_fast_cuda"].tune_regime is None
    call_ms = by["dla_fast_auto"].tune_call_ms  # None where an earlier test's verdict was in the plan cache
    assert call_ms is None or (set(call_ms) == {"measured", "paced", "cuda"} and all(v > 0 for v in call_ms.values()))
