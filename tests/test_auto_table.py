"""The measured backend table behind backend="auto": its keys match what the fused model asks for, it only
applies on the card it was measured on, and its generator keeps noise from flipping choices. CPU only."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dla_fast
from dla_fast.ops import _backends, auto_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "dla_fast", "ops", "auto_table.json")


@pytest.fixture(autouse=True)
def _fresh_table(monkeypatch):
    monkeypatch.delenv("DLA_FAST_AUTO_TABLE", raising=False)
    auto_table.reload()
    yield
    auto_table.reload()


def _fake_gpu(monkeypatch, cap):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: cap)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    auto_table.reload()


def test_every_layer_knows_its_input_size():
    fast = dla_fast.optimize(dla_fast.create_model("dla34"), dtype=torch.float32)
    layers = dict(fast.fused_layers())
    assert all(m.in_hw is not None for m in layers.values())
    assert layers["base_layer.0"].in_hw == (224, 224)
    assert layers["level5.root"].in_hw == (7, 7)
    assert layers["level2.tree1.conv1"].in_hw == (112, 112)  # the stride-2 conv reads level1's output
    assert layers["level2.tree1.conv2"].in_hw == (56, 56)
    assert layers["base_layer.0"].shape_key() == _backends.conv_key((16, 3, 7, 7), (1, 1), (3, 3), 1, torch.float32,
                                                                    (224, 224))


@pytest.mark.slow
def test_table_keys_are_keys_the_models_produce():
    """Every entry of the committed table must be reachable: same key format as the fused layers build."""
    table = json.load(open(TABLE))
    assert table["capability"] == [9, 0] and table["entries"]
    produced = set()
    for name in dla_fast.list_models():
        fast = dla_fast.optimize(dla_fast.create_model(name), dtype=torch.float16)
        for _, m in fast.fused_layers():
            k = m.shape_key()
            for dt in ("float16", "bfloat16"):
                produced.add(k[:-2] + (dt,) + k[-1:])
    unknown = [e["key"] for e in table["entries"] if auto_table._tuplify(e["key"]) not in produced]
    assert not unknown, unknown[:5]
    assert {e["backend"] for e in table["entries"]} <= {"triton", "cuda", "eager"}


def test_table_applies_only_on_its_card(monkeypatch):
    entry = next(e for e in json.load(open(TABLE))["entries"] if e["backend"] != e["default"])
    key = auto_table._tuplify(entry["key"])
    assert auto_table.lookup(key, torch.device("cpu")) is None
    _fake_gpu(monkeypatch, (8, 0))
    assert auto_table.lookup(key, torch.device("cuda", 0)) is None
    _fake_gpu(monkeypatch, (9, 0))
    assert auto_table.lookup(key, torch.device("cuda", 0)) == entry["backend"]
    assert _backends.auto_preference(key, torch.device("cuda", 0))[0] == entry["backend"]
    assert auto_table.lookup(key[:-1] + (None,), torch.device("cuda", 0)) is None  # size unknown: no entry
    monkeypatch.setenv("DLA_FAST_AUTO_TABLE", "off")
    auto_table.reload()
    assert auto_table.lookup(key, torch.device("cuda", 0)) is None


def test_fixed_rules_for_few_input_channels():
    stem = _backends.conv_key((16, 3, 7, 7), (1, 1), (3, 3), 1, torch.float16, (224, 224))
    other = _backends.conv_key((32, 3, 3, 3), (2, 2), (1, 1), 1, torch.float16, (224, 224))
    wide = _backends.conv_key((64, 64, 3, 3), (1, 1), (1, 1), 1, torch.float16, (56, 56))
    assert _backends.auto_preference(stem) == ("cuda", "eager")
    assert _backends.auto_preference(other) == ("eager",)
    assert _backends.auto_preference(wide) == ()


def _run(shape_id, label, shape, times, rel=None, count=1):
    rows = [dict(shape_id=shape_id, dtype="float16", impl=i, ms=t, rel_err=(rel or {}).get(i, 1e-4))
            for i, t in times.items()]
    return dict(id=shape_id, label=label, shape=shape, count=count), rows


def test_generator_margin_and_bad_rows(tmp_path, monkeypatch):
    conv = dict(op="conv_bn_act", cin=[64], hw=[56, 56], cout=64, weight_shape=[64, 64, 3, 3], stride=[1, 1],
                padding=[1, 1], groups=1)
    conv2 = dict(conv, hw=[28, 28])
    conv3 = dict(conv, hw=[14, 14])
    s1, r1 = _run("a", "within margin", conv, {"triton": 1.00, "cuda": 0.97, "eager": 1.5})
    s2, r2 = _run("b", "clear winner", conv2, {"triton": 1.00, "cuda": 2.0, "eager": 0.5})
    s3, r3 = _run("c", "fast but wrong", conv3, {"triton": 1.00, "cuda": 0.1, "eager": 2.0}, rel={"cuda": 0.9})
    run = dict(device="Fake GPU", capability="9.0", batch=256, hw=[224, 224], shapes=[s1, s2, s3], rows=r1 + r2 + r3)
    src = tmp_path / "run.json"
    src.write_text(json.dumps(run))
    out = tmp_path / "table.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_auto_table.py"), str(src), "-o", str(out)],
                   check=True, capture_output=True, text=True)
    table = json.loads(out.read_text())
    by_hw = {tuple(e["key"][-1]): e["backend"] for e in table["entries"]}
    assert by_hw == {(56, 56): "triton", (28, 28): "eager", (14, 14): "triton"}
    monkeypatch.setenv("DLA_FAST_AUTO_TABLE", str(out))
    _fake_gpu(monkeypatch, (9, 0))
    key = _backends.conv_key((64, 64, 3, 3), (1, 1), (1, 1), 1, torch.float16, (28, 28))
    assert auto_table.lookup(key, torch.device("cuda", 0)) == "eager"


def test_generator_keeps_batch_sizes_apart(tmp_path, monkeypatch):
    """A batch-256 and a batch-1 run of the same shape give two entries; lookups take the nearer one (ties
    to the smaller), and a fused layer switches backends at the boundary that lookup implies."""
    conv = dict(op="conv_bn_act", cin=[512], hw=[7, 7], cout=512, weight_shape=[512, 512, 3, 3], stride=[1, 1],
                padding=[1, 1], groups=1)
    s, r256 = _run("a", "deep 3x3", conv, {"triton": 1.0, "cuda": 0.5, "eager": 2.0})
    _, r1 = _run("a", "deep 3x3", conv, {"triton": 0.01, "cuda": 0.05, "eager": 0.02})
    runs = []
    for batch, rows in ((256, r256), (1, r1)):
        p = tmp_path / f"bs{batch}.json"
        p.write_text(json.dumps(dict(device="Fake GPU", capability="9.0", batch=batch, hw=[224, 224], shapes=[s],
                                     rows=rows)))
        runs.append(str(p))
    out = tmp_path / "table.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_auto_table.py"), *runs, "-o", str(out)],
                   check=True, capture_output=True, text=True)
    table = json.loads(out.read_text())
    assert table["batch"] == [1, 256]
    assert sorted((e["batch"], e["backend"]) for e in table["entries"]) == [(1, "triton"), (256, "cuda")]
    monkeypatch.setenv("DLA_FAST_AUTO_TABLE", str(out))
    _fake_gpu(monkeypatch, (9, 0))
    key = _backends.conv_key((512, 512, 3, 3), (1, 1), (1, 1), 1, torch.float16, (7, 7))
    dev = torch.device("cuda", 0)
    assert auto_table.batches(key) == (1, 256)
    assert [auto_table.lookup(key, dev, b) for b in (1, 2, 16, 17, 64, 256, 4096)] == \
        ["triton"] * 3 + ["cuda"] * 4
    assert auto_table.lookup(key, dev) == "cuda"                       # batch unknown: the throughput entry
    assert auto_table.batch_bounds((1, 256)) == (16.0, float("inf"))

    # The layer: select() stands in for a GPU, naming the backend that the table picks at each batch.
    triton_mod, cuda_mod = type("T", (), {"NAME": "triton"}), type("C", (), {"NAME": "cuda"})
    mods = {"triton": triton_mod, "cuda": cuda_mod}
    monkeypatch.setattr(_backends, "select",
                        lambda op, backend, x, g, key=None, batch=None, launch_bound=False:
                        mods[auto_table.lookup(key, dev, batch)])
    from dla_fast.fuse import FusedConvBnAct
    layer = FusedConvBnAct(torch.nn.Conv2d(512, 512, 3, padding=1, bias=False), torch.nn.BatchNorm2d(512).eval(),
                           True, "auto", torch.float16)
    layer.in_hw = (7, 7)
    layer.resolve(torch.device("meta"), torch.float16)
    assert layer._impl is cuda_mod
    assert [layer.impl_for(b).NAME for b in (1, 16, 17, 256)] == ["triton", "triton", "cuda", "cuda"]
    assert layer.backend_note() == "cuda (batch <= 16: triton)"


def test_small_batches_without_a_graph_prefer_cheap_launches(monkeypatch):
    """Eager small batches are paced by the host's launch cost: auto takes the launch-bound choice there, and
    the GPU-time choice under a CUDA graph (graph_mode, as CudaGraphRunner uses it) or at large batches."""
    from dla_fast import fuse
    triton_mod, cuda_mod = type("T", (), {"NAME": "triton"}), type("C", (), {"NAME": "cuda"})

    def select(op, backend, x, g, key=None, batch=None, launch_bound=False):
        return None if launch_bound else (triton_mod if batch == 1 else cuda_mod)  # None: eager (cuDNN)
    monkeypatch.setattr(_backends, "select", select)
    monkeypatch.setattr(auto_table, "batches", lambda key: (1, 256))
    layer = fuse.FusedConvBnAct(torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.nn.BatchNorm2d(64).eval(),
                                True, "auto", torch.float16)
    layer.resolve(torch.device("meta"), torch.float16)
    assert layer.impl_for(1) is None and layer.impl_for(fuse.LAUNCH_BOUND_BATCH) is None     # eager, cheap launch
    assert layer.impl_for(fuse.LAUNCH_BOUND_BATCH + 1) is cuda_mod
    with fuse.graph_mode():
        assert layer.impl_for(1) is triton_mod and layer.impl_for(256) is cuda_mod
        with fuse.graph_mode():
            pass
        assert layer.impl_for(1) is triton_mod                                                  # nesting restores
    assert layer.impl_for(1) is None
    assert layer.impl_for(1, replayed=True) is triton_mod
    assert layer.backend_note() == "cuda (batch <= 16: triton; batch <= 16 without a CUDA graph: eager)"
    # a forced backend never switches
    forced = fuse.FusedConvBnAct(torch.nn.Conv2d(64, 64, 3, padding=1, bias=False),
                                 torch.nn.BatchNorm2d(64).eval(), True, "triton", torch.float16)
    forced.resolve(torch.device("meta"), torch.float16)
    assert forced._launch_bound == (False, None) and forced._by_batch is None
