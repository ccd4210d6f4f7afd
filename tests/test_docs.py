"""What the docs promise: the README's usage runs as written, every environment switch is in the one table, and
the results directory stays curated."""
import os
import re
import subprocess
import sys

import pytest
import torch

import dla_fast
from dla_fast import _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_readme_usage_runs_as_written(monkeypatch):
    """The README's Python block, run as it stands (timm's hub weights replaced by random ones: no network)."""
    pytest.importorskip("timm")
    import dla_fast.models as models
    monkeypatch.setattr(models, "hub_state_dict", lambda name: dla_fast.create_model(name).state_dict())
    block = re.search(r"```python\n(.*?)```", _read("README.md"), re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert scope["logits"].shape == (8, 1000)
    assert [m.shape[1] for m in scope["maps"]] == [64, 128, 256, 512]
    assert "batch 8, 224x224" in scope["fast"].summary(batch=8)


def test_readme_stays_short_and_names_real_paths():
    text = _read("README.md")
    assert len(text.splitlines()) <= 150
    for path in re.findall(r"`((?:benchmarks|docs|dla_fast|csrc|tools)/[\w./-]+)`", text):
        assert os.path.exists(os.path.join(ROOT, path)), f"the README names {path}, which does not exist"


def test_environment_switches_are_all_in_the_one_table():
    doc = _read("docs/environment.md")
    assert _env.markdown_table() in doc, "docs/environment.md is out of date: regenerate its table from _env.py"
    used = set()
    for base in ("dla_fast", "csrc", "tests", "benchmarks", "setup.py", "Makefile", ".ci"):
        p = os.path.join(ROOT, base)
        files = [p] if os.path.isfile(p) else [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                                                if f.endswith((".py", ".h", ".cpp", ".cu", ".cuh", ".sh", "run"))]
        for f in files:
            if os.path.basename(f) == "test_docs.py":
                continue
            with open(f, errors="replace") as fh:
                used |= {v for v in re.findall(r"\bDLA_FAST_[A-Z0-9_]+", fh.read()) if not v.endswith("_")}
    known = {s.name for s in _env.SWITCHES}
    # DLA_FAST_SM90A is a compile-time define setup.py passes to the C++ code, not an environment variable.
    assert used - known <= {"DLA_FAST_SM90A"}, sorted(used - known)
    with pytest.raises(KeyError, match="not a dla_fast switch"):
        _env.get("DLA_FAST_NOPE")


def test_switches_are_read_once(monkeypatch):
    monkeypatch.setenv("DLA_FAST_TRITON_POISON", "1")
    _env.reload()
    assert _env.flag("DLA_FAST_TRITON_POISON")
    monkeypatch.setenv("DLA_FAST_TRITON_POISON", "0")
    assert _env.flag("DLA_FAST_TRITON_POISON")  # still the value read first
    _env.reload()
    assert not _env.flag("DLA_FAST_TRITON_POISON")


def test_a_word_switch_takes_the_words_its_table_lists(monkeypatch):
    monkeypatch.delenv("DLA_FAST_TRAIN_WGRAD", raising=False)
    _env.reload()
    assert _env.choice("DLA_FAST_TRAIN_WGRAD") is None
    monkeypatch.setenv("DLA_FAST_TRAIN_WGRAD", " ATen ")
    _env.reload()
    assert _env.choice("DLA_FAST_TRAIN_WGRAD") == "aten"
    monkeypatch.setenv("DLA_FAST_TRAIN_WGRAD", "cudnn")
    _env.reload()
    with pytest.raises(ValueError, match="DLA_FAST_TRAIN_WGRAD='cudnn' is not a mode: use aten or triton"):
        _env.choice("DLA_FAST_TRAIN_WGRAD")
    monkeypatch.delenv("DLA_FAST_TRAIN_WGRAD")
    _env.reload()


def test_results_directory_is_curated():
    d = os.path.join(ROOT, "benchmarks", "results")
    files = [f for f in os.listdir(d) if os.path.isfile(os.path.join(d, f))]
    size = sum(os.path.getsize(os.path.join(d, f)) for f in files)
    assert len(files) <= 25 and size <= 3 * 2 ** 20, (len(files), size)
    readme = _read("benchmarks/results/README.md")
    for f in files:
        stem = f.split(".")[0]
        assert f == "README.md" or stem in readme, f"benchmarks/results/{f} is not described in its README"


def test_version_has_one_source():
    setup = _read("setup.py")
    assert "version=version()" in setup and re.search(r"version=\"", setup) is None
    out = subprocess.run([sys.executable, os.path.join(ROOT, "setup.py"), "--version"], capture_output=True,
                         text=True, cwd=ROOT, env=dict(os.environ, DLA_FAST_SKIP_CUDA="1"))
    assert out.stdout.strip().splitlines()[-1] == dla_fast.__version__, out.stdout + out.stderr


def test_info_says_whether_the_extension_is_loaded():
    out = subprocess.run([sys.executable, "-m", "dla_fast", "info"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "extension dla_fast._C:" in out.stdout and ("built and loaded" in out.stdout or "not loaded" in out.stdout)
    assert "backend eager  : available" in out.stdout
    assert torch.__version__ in out.stdout
