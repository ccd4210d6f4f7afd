"""Data-parallel benchmarking on torch.distributed: the pure parts in process (where a rank is, the aggregation,
the table, the relaunch command, the CLI's errors), then real launches of 2 processes on the CPU with gloo
(torchrun): the bench harness end to end, DDP gradients against one process on the concatenated batch, two ranks
tuning at once, and a failing rank.

Run as a script under torchrun, this file is also the worker of those launches (``python -m torch.distributed.run
... tests/test_distributed.py MODE OUT``).
"""
import copy
import gc
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dla_fast import cli
from dla_fast import distributed as D
from dla_fast.verify import FLOOR, RATIO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT_S = 300
# the smallest real run: 2 images of 32x32 per rank, two timing rounds of one step
# the training steps DDP runs (a captured step has no DDP)
UNCAPTURED = [i for i in D.TRAIN_IMPLS if not i.endswith("_graph")]
SMALL = ["--device", "cpu", "--model", "dla46_c", "--hw", "32", "--batch-size", "2", "--rounds", "2", "--iters", "1"]


# ------------------------------------------------------------------------------------------ where a rank is


def test_world_from_env():
    assert D.world_from_env({}) is None
    assert D.world_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == D.World(3, 8, 3)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE set but LOCAL_RANK not: launch with torchrun"):
        D.world_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="must be integers"):
        D.world_from_env({"RANK": "zero", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="not a valid place in a launch"):
        D.world_from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_rank_device():
    assert D.rank_device("cpu", 5, 0) == torch.device("cpu")
    assert D.rank_device("cuda", 3, 4) == torch.device("cuda", 3)
    with pytest.raises(ValueError, match=r"LOCAL_RANK 4 needs GPU 4, but this node shows 4 GPU\(s\).*"
                                         r"--nproc_per_node 4"):
        D.rank_device("cuda", 4, 4)
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        D.rank_device("mps", 0, 0)


# ------------------------------------------------------------------------------------------ aggregation


def _rec(impl, samples, alone=(), error=None, mode="infer", **kw):
    rec = {"model": "dla34", "dtype": "float16", "batch_size": 4, "impl": impl, "mode": mode, "error": error,
           "samples_s": list(samples), "alone_samples_s": list(alone), "first_s": 1.0, "rel_err": 1e-3,
           "peak_mem_mb": 10.0, "backends_used": None}
    rec.update(kw)
    return rec


def test_combine_errors():
    assert D.combine_errors([None, None]) is None
    assert D.combine_errors([None, "E: x"]) == "rank 1: E: x"
    assert D.combine_errors(["E: x", "E: x"]) == "every rank: E: x"
    assert D.combine_errors(["E: x", None, "E: y", "E: x"]) == "ranks 0, 3: E: x; rank 2: E: y"
    assert D.combine_errors(["E: x"]) == "E: x"


def test_aggregate_figures():
    # rank 0: 4 images in 0.010 s (400 img/s); rank 1: 0.020 s (200 img/s); rank 0 alone: 0.008 s (500 img/s)
    r0 = [_rec("a", [0.010, 0.011, 0.009], alone=[0.008, 0.008, 0.009], first_s=2.0),
          _rec("b", [], error="every rank: skipped: needs a GPU")]
    r1 = [_rec("a", [0.020, 0.019, 0.021], peak_mem_mb=12.0, rel_err=2e-3),
          _rec("b", [], error="every rank: skipped: needs a GPU")]
    a, b = D.aggregate([r0, r1])
    assert a["per_rank_img_per_s"] == [400.0, 200.0]
    assert a["agg_img_per_s"] == 600.0
    assert a["single_img_per_s"] == 500.0
    assert a["efficiency"] == pytest.approx(600 / (2 * 500), abs=1e-3)
    # the slowest rank's samples are rank 1's: 8 images per 0.020 s median
    assert a["paced_img_per_s"] == 400.0 and a["ms"] == pytest.approx(20.0)
    assert (a["first_s"], a["peak_mem_mb"], a["rel_err"], a["world_size"]) == (2.0, 12.0, 2e-3, 2)
    assert b["error"] == "every rank: skipped: needs a GPU" and b["agg_img_per_s"] is None
    # records that differ by rank are combined with the ranks named
    (c,) = D.aggregate([[_rec("c", [0.01], alone=[0.01])], [_rec("c", [], error="OOM: 1")]])
    assert c["error"] == "rank 1: OOM: 1"


def test_aggregate_one_rank_and_pacing():
    (row,) = D.aggregate([[_rec("a", [0.004, 0.004], alone=[0.004, 0.004])]])
    assert row["efficiency"] == 1.0 and row["agg_img_per_s"] == row["paced_img_per_s"] == 1000.0
    # the ranks alternate being slow: each rank's median is fast, the node is paced by the slow one each round
    r0 = _rec("a", [0.001, 0.004, 0.001], alone=[0.001])
    r1 = _rec("a", [0.004, 0.001, 0.004], alone=[])
    (row,) = D.aggregate([[r0], [r1]])
    assert row["per_rank_img_per_s"] == [4000.0, 1000.0]
    assert row["paced_img_per_s"] == 2000.0  # 8 images per 0.004 s


def test_aggregate_rejects_mismatched_ranks():
    with pytest.raises(ValueError, match="at least one rank"):
        D.aggregate([])
    with pytest.raises(ValueError, match="rank 1 reported 2 cases, rank 0 1"):
        D.aggregate([[_rec("a", [0.1], [0.1])], [_rec("a", [0.1]), _rec("b", [0.1])]])
    with pytest.raises(ValueError, match="rank 1's case 0 is .*'b'.* rank 0's is .*'a'"):
        D.aggregate([[_rec("a", [0.1], [0.1])], [_rec("b", [0.1])]])
    with pytest.raises(ValueError, match=r"the ranks took \[2, 1\] samples"):
        D.aggregate([[_rec("a", [0.1, 0.1], [0.1])], [_rec("a", [0.1])]])
    (row,) = D.aggregate([[_rec("a", [0.1])], [_rec("a", [0.1])]])
    assert row["error"] == "no timing samples (rank 0 alone)"
    (row,) = D.aggregate([[_rec("a", [0.0], [0.1])], [_rec("a", [0.1])]])
    assert "raise --iters" in row["error"]


def test_format_table():
    r0 = [_rec("a", [0.010], alone=[0.008]), _rec("b", [], error="every rank: skipped: needs a GPU", mode="train")]
    r1 = [_rec("a", [0.020]), _rec("b", [], error="every rank: skipped: needs a GPU", mode="train")]
    result = {"world_size": 2, "backend": "nccl", "torch": "2", "triton": "3", "date": "today", "hw": [224, 224],
              "ranks": [{"rank": r, "host": "node", "device": "GPU"} for r in range(2)], "mode": "infer",
              "rows": D.aggregate([r0, r1])}
    t = D.format_table(result)
    assert "2 ranks (nccl) on 1 node(s): GPU" in t
    assert "| dla34 | float16 | 4 | a | 500.0 | 400.0 / 200.0 | 600.0 | 400.0 | 0.600 |" in t
    assert "| b (train) | - |" in t and "skipped: needs a GPU" in t


def test_rank0_only_rows():
    """A captured step has no DDP: rank 0's figure only, from its alone samples; no all-ranks figures."""
    r0 = [_rec("g", [], alone=[0.004, 0.005, 0.004], mode="train", alone_only=True)]
    r1 = [_rec("g", [], mode="train", alone_only=True)]
    (row,) = D.aggregate([r0, r1])
    assert row["error"] is None and row["alone_only"]
    assert row["single_img_per_s"] == 1000.0 and row["ms"] == pytest.approx(4.0)
    assert row["agg_img_per_s"] is None and row["per_rank_img_per_s"] is None and row["efficiency"] is None
    t = D.format_table({"world_size": 2, "backend": "nccl", "torch": "2", "triton": "3", "date": "today",
                        "ranks": [{"rank": r, "host": "node", "device": "GPU"} for r in range(2)], "mode": "train",
                        "rows": [row]})
    assert "| g (train) | 1000.0 | no DDP | - | - | - |" in t
    (row,) = D.aggregate([[_rec("g", [], alone=[], mode="train", alone_only=True)]])
    assert row["error"] == "no timing samples (rank 0 alone)"


def test_relaunch_command():
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "dla_fast"]
    assert D.relaunch_command(4, ["bench", "--distributed", "4", "--hw", "64"]) == head + ["bench", "--hw", "64"]
    assert D.relaunch_command(4, ["bench", "--distributed=4", "--train"]) == head + ["bench", "--train"]
    assert D.relaunch_command(4, ["bench", "--distrib", "4"]) == head + ["bench"]  # argparse's abbreviation


# ------------------------------------------------------------------------------------------ the CLI's errors


@pytest.fixture
def no_torchrun(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)


def _cli_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return str(e.value)


def test_cli_errors(no_torchrun, monkeypatch, tmp_path):
    cpu = ["bench", "--device", "cpu", "--model", "dla34"]
    assert "--train times data-parallel training steps (DDP) across processes: add --distributed N" \
        in _cli_error(cpu + ["--train"])
    assert "--distributed must be >= 1, got 0" in _cli_error(cpu + ["--distributed", "0"])
    assert ("no training step for impl(s) dla_fast_triton; choose from: timm_eager, torch_compile, dla_fast_eager, "
            "dla_fast_fused") \
        in _cli_error(cpu + ["--distributed", "2", "--train", "--impl", "dla_fast_triton"])
    assert "unknown impl(s) nope" in _cli_error(cpu + ["--distributed", "2", "--train", "--impl", "nope"])
    assert "--features applies to inference only" in _cli_error(cpu + ["--distributed", "2", "--train",
                                                                      "--features"])
    assert "--tune applies to inference only" in _cli_error(cpu + ["--distributed", "2", "--train", "--tune"])
    # bad arguments fail here, before N processes start to fail them N times
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    assert "--hw 65" in _cli_error(cpu + ["--distributed", "2", "--hw", "65"])
    assert "cannot write --json" in _cli_error(cpu + ["--distributed", "2", "--json", str(tmp_path)])
    assert launched == []
    assert cli.main(cpu + ["--distributed", "2", "--hw", "64"]) == 0
    assert launched == [D.relaunch_command(2, cpu + ["--hw", "64"])]
    # one GPU per process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "--distributed 4 needs one GPU per process, and 2 GPU(s) are visible" in _cli_error(
        ["bench", "--device", "cuda", "--distributed", "4"])


def test_plain_bench_stays_single_process(no_torchrun, tmp_path, capsys):
    out = tmp_path / "one.json"
    assert cli.main(["bench", *SMALL, "--impl", "dla_fast_eager", "--warmup", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "world_size" not in r and [x["impl"] for x in r["rows"]] == ["dla_fast_eager"]
    assert r["rows"][0]["img_per_s"] > 0
    assert "| model | dtype | batch | impl | img/s |" in capsys.readouterr().out


def test_cli_errors_under_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert "RANK, WORLD_SIZE set but LOCAL_RANK not" in _cli_error(["bench", "--device", "cpu"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert "--distributed N starts torchrun itself" in _cli_error(["bench", "--device", "cpu", "--distributed", "2"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "rank 1: LOCAL_RANK 1 needs GPU 1, but this node shows 1 GPU(s)" in _cli_error(
        ["bench", "--device", "cuda", "--model", "dla34"])


# ------------------------------------------------------------------------------------------ launches (gloo)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TRITON_INTERPRET", None)  # the eager path: these tests are about processes, not kernels
    env["OMP_NUM_THREADS"] = "1"
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    return env


def _torchrun(args, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


def _ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
    return p


def test_bench_under_torchrun(tmp_path):
    out = tmp_path / "bench.json"
    p = _ok(_torchrun(["-m", "dla_fast", "bench", *SMALL, "--warmup", "0", "--json", str(out),
                       "--impl", "timm_eager,dla_fast_eager,dla_fast_cudagraph"]))
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["backend"] == "gloo" and r["mode"] == "infer"
    assert [x["rank"] for x in r["ranks"]] == [0, 1]
    rows = {x["impl"]: x for x in r["rows"]}
    assert set(rows) == {"timm_eager", "dla_fast_eager", "dla_fast_cudagraph"}
    for impl in ("timm_eager", "dla_fast_eager"):
        row = rows[impl]
        assert row["error"] is None and row["world_size"] == 2 and row["batch_size"] == 2
        assert len(row["per_rank_img_per_s"]) == 2 and all(v > 0 for v in row["per_rank_img_per_s"])
        assert row["agg_img_per_s"] == pytest.approx(sum(row["per_rank_img_per_s"]), abs=0.11)
        assert row["single_img_per_s"] > 0 and row["paced_img_per_s"] > 0
        assert row["efficiency"] == pytest.approx(row["agg_img_per_s"] / (2 * row["single_img_per_s"]), abs=2e-3)
        assert row["rel_err"] < 1e-3  # float32, both ranks
    assert rows["dla_fast_cudagraph"]["error"] == "every rank: skipped: needs a GPU"
    assert p.stdout.count("| model | dtype | batch/rank |") == 1  # only rank 0 prints
    assert p.stderr.count("bench: models=dla46_c") == 1  # and logs


def test_train_bench_through_distributed_flag(tmp_path):
    out = tmp_path / "train.json"
    cmd = [sys.executable, "-m", "dla_fast", "bench", "--distributed", "2", "--train", *SMALL, "--warmup", "1",
           "--json", str(out)]
    p = _ok(subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S))
    assert "launching: " in p.stderr and "--nproc_per_node=2" in p.stderr
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["mode"] == "train"
    assert [x["impl"] for x in r["rows"]] == list(D.TRAIN_DEFAULT_IMPLS["cpu"])
    for row in r["rows"]:
        assert row["error"] is None and row["mode"] == "train" and len(row["per_rank_img_per_s"]) == 2
        assert row["efficiency"] > 0 and row["rel_err"] is None
    assert "timm_eager (train)" in p.stdout
    assert r["cudnn_benchmark"] is True and " (benchmark on) |" in p.stdout  # set on every rank, as timm's scripts do


def test_ddp_gradients_equal_one_process_on_the_concatenated_batch(tmp_path):
    """Two ranks with DDP, each on half of a batch, against one process on the whole batch, in float64.

    BN runs in eval mode (frozen statistics, as detection fine-tuning uses): in training mode each process
    normalises with its own half's statistics by design, so the gradients differ from the whole batch's. With
    frozen BN the mean loss over the whole batch is the mean of the two halves' mean losses, DDP's averaged
    gradient is its gradient, and float64 leaves only summation-order rounding (~1e-15)."""
    out = tmp_path / "grads.json"
    _ok(_torchrun([__file__, "grads", str(out)]))
    r = json.loads(out.read_text())
    assert set(r) == set(UNCAPTURED)
    for impl, ranks in r.items():
        assert len(ranks) == 2
        for x in ranks:
            assert x["params"] > 50, impl
            assert x["grad_err"] < 1e-12, (impl, x)
            assert x["update_err"] < 1e-12, (impl, x)
            # without the all-reduce a rank's gradient is its half's, far from the whole batch's
            assert x["half_err"] > 1e-3, (impl, x)


def test_ranks_tuning_at_once_measure_once(tmp_path):
    """Two ranks call dla_fast.tune on the same model at once (fake timer, CPU): one measures, one reuses."""
    out = tmp_path / "tune.json"
    env = _env()
    env["DLA_FAST_CACHE_DIR"] = str(tmp_path / "cache")
    env["DLA_FAST_PRIOR"] = "off"
    _ok(_torchrun([__file__, "tune", str(out)], env=env))
    r = json.loads(out.read_text())
    n = r[0]["layers"]
    assert n > 20 and all(x["layers"] == n for x in r)
    assert sorted((x["measured"], x["reused"]) for x in r) == [(0, n), (n, 0)]
    files = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".json")]
    assert len(files) == 1 and len(json.loads((tmp_path / "cache" / files[0]).read_text())["entries"]) == n


def test_a_failing_rank(tmp_path):
    """A build that fails on rank 1 only is that implementation's error row on every rank (the others run on);
    an exception on rank 1 while timing ends the launch non-zero, with rank 1's message."""
    out = tmp_path / "fail.json"
    p = _torchrun([__file__, "fail", str(out)])
    rows = {x["impl"]: x for x in json.loads(out.read_text())}
    assert rows["fine"]["error"] is None and rows["fine"]["agg_img_per_s"] > 0
    assert rows["flaky"]["error"] == "rank 1: RuntimeError: out of memory on this rank (injected)"
    assert p.returncode != 0
    assert "error: rank 1 of 2 (cpu on " in p.stderr
    assert "failed: RuntimeError: rank 1's step broke (injected)" in p.stderr


def test_no_ddp_model_outlives_its_group(tmp_path):
    """After run() returns no DDP module is left for a later collection: one that outlived destroy_process_group
    was destroyed at interpreter exit, where gloo's threads sometimes aborted the process after a finished run."""
    out = tmp_path / "teardown.json"
    _ok(_torchrun([__file__, "teardown", str(out)]))
    r = json.loads(out.read_text())
    assert [x["rows"] for x in r] == [2, None]  # rank 0 returns the result
    assert [x["ddp_built"] for x in r] == [2, 2]  # both training workloads wrapped their model in DDP
    assert [x["ddp_alive"] for x in r] == [0, 0]


@pytest.mark.cuda
@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_bench_on_gpus(tmp_path, train):
    """NCCL, one GPU per rank: up to 2 ranks (1 on a one-GPU machine: NCCL and DDP with a world of one)."""
    n = min(torch.cuda.device_count(), 2)
    out = tmp_path / "gpu.json"
    env = _env()
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, as docs/distributed.md runs it
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    args = ["--device", "cuda", "--model", "dla34", "--hw", "64", "--batch-size", "8", "--rounds", "2",
            "--json", str(out)]
    args += ["--train", "--dtype", "bfloat16"] if train else ["--dtype", "float16",
                                                              "--impl", "timm_eager,dla_fast_auto"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
           "dla_fast", "bench", *args]
    _ok(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S))
    r = json.loads(out.read_text())
    assert r["world_size"] == n and r["backend"] == "nccl"
    assert [x["cuda_index"] for x in r["ranks"]] == list(range(n))
    assert len({x["gpu_uuid"] for x in r["ranks"]}) == n  # each rank on its own GPU
    for row in r["rows"]:
        assert row["error"] is None, row
        if row.get("alone_only"):  # the captured step: rank 0 alone, no DDP
            assert row["impl"].endswith("_graph") and row["single_img_per_s"] > 0
            continue
        assert len(row["per_rank_img_per_s"]) == n and row["efficiency"] > 0
    if train:
        assert "dla_fast_fused_graph" in {row["impl"] for row in r["rows"]}
    if not train:
        # Both rows against the same float32 reference: the fused model's error within twice timm's fp16 error
        errs = {row["impl"]: row["rel_err"] for row in r["rows"]}
        assert errs["dla_fast_auto"] <= RATIO * errs["timm_eager"] + FLOOR[torch.float16], errs


# ------------------------------------------------------------------------------------------ the workers


def _worker_grads(ctx: D.Context, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    n, r = 2, ctx.rank
    for impl in UNCAPTURED:
        base = D.freeze_bn(D.train_model(impl, "dla46_c").double().train())
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(n * ctx.world_size, 3, 32, 32, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 1000, (n * ctx.world_size,), generator=gen)
        half = slice(n * r, n * r + n)
        ddp = DDP(copy.deepcopy(base))
        whole, alone = copy.deepcopy(base), copy.deepcopy(base)
        D.make_train_step(ddp, D.sgd(ddp), x[half], y[half])()
        D.make_train_step(whole, D.sgd(whole), x, y)()
        D.make_train_step(alone, D.sgd(alone), x[half], y[half])()

        def err(a, b):
            return max(((p - q).norm() / q.norm().clamp_min(1e-300)).item() for p, q in zip(a, b))
        trio = list(zip(base.parameters(), ddp.module.parameters(), whole.parameters(), alone.parameters()))
        results[impl] = {"params": len(trio),
                         "grad_err": err([d.grad for _, d, _, _ in trio], [w.grad for _, _, w, _ in trio]),
                         "update_err": err([d - b for b, d, _, _ in trio], [w - b for b, _, w, _ in trio]),
                         "half_err": err([a.grad for _, _, _, a in trio], [w.grad for _, _, w, _ in trio])}
    got = ctx.gather(results)
    if ctx.is_main:
        with open(out, "w") as f:
            json.dump({impl: [g[impl] for g in got] for impl in UNCAPTURED}, f)


def _worker_tune(ctx: D.Context, out: str) -> None:
    import dla_fast
    from dla_fast.plan.timing import FakeTimer

    def slow(fn):
        time.sleep(0.005)  # long enough that the ranks overlap: without the lock both would measure
        return 1e-3
    fast = dla_fast.optimize(dla_fast.create_model("dla46_c"), dtype=torch.float32)
    ctx.barrier()  # start together
    rep = dla_fast.tune(fast, (32, 32), [1], timer=FakeTimer(slow), budget_s=None, progress=False)
    got = ctx.gather({"measured": rep.measured, "reused": rep.reused, "layers": rep.layers})
    if ctx.is_main:
        with open(out, "w") as f:
            json.dump(got, f)


def _worker_fail(ctx: D.Context, out: str) -> None:
    def fine():
        return D.Workload(step=lambda: time.sleep(0.001))

    def flaky():
        if ctx.rank == 1:
            raise RuntimeError("out of memory on this rank (injected)")
        return fine()
    recs = D.measure(ctx, [D.Case("fine", "infer", fine), D.Case("flaky", "infer", flaky)], rounds=2, iters=1,
                     warmup=0)
    for rec in recs:
        rec.update(model="m", dtype="float32", batch_size=2)
    got = ctx.gather(recs)
    if ctx.is_main:
        with open(out, "w") as f:
            json.dump(D.aggregate(got), f)
    calls = [0]

    def step():
        calls[0] += 1
        if ctx.rank == 1 and calls[0] == 2:
            raise RuntimeError("rank 1's step broke (injected)")
        time.sleep(0.001)
    D.measure(ctx, [D.Case("boom", "infer", lambda: D.Workload(step=step))], rounds=3, iters=1, warmup=0)


def _worker_teardown(ctx: D.Context, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    built = [0]
    init = DistributedDataParallel.__init__

    def counting_init(self, *a, **kw):
        built[0] += 1
        init(self, *a, **kw)
    DistributedDataParallel.__init__ = counting_init
    try:
        res = D.run(ctx, ["dla46_c"], [torch.float32], [2], list(D.TRAIN_DEFAULT_IMPLS["cpu"]), (32, 32), rounds=1,
                    iters=1, warmup=0, train=True)
    finally:
        DistributedDataParallel.__init__ = init
    # no gc.collect() here: what is alive now would otherwise outlive close()'s destroy_process_group
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    got = ctx.gather({"rows": len(res["rows"]) if res is not None else None, "ddp_built": built[0], "ddp_alive": alive})
    if ctx.is_main:
        with open(out, "w") as f:
            json.dump(got, f)


if __name__ == "__main__":
    mode, out_path = sys.argv[1], sys.argv[2]
    context = D.Context(D.world_from_env(), torch.device("cpu"))
    with context.failing_loudly():
        workers = {"grads": _worker_grads, "tune": _worker_tune, "fail": _worker_fail, "teardown": _worker_teardown}
        workers[mode](context, out_path)
    context.close()
