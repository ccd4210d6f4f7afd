"""``python -m dla_fast``: bad arguments are refused before anything is measured, with a message that says what to
change; the commands run on the CPU."""
import json
import os
import subprocess
import sys

import pytest

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
