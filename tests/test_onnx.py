"""ONNX export (torch.onnx.export(..., dynamo=True)) of the eager models, run by onnxruntime on the CPU.

Errors are relative in the Frobenius norm over the whole output (helpers.rel_err), against the eager fp32
forward. The inputs are small (64x64, 63x64) to keep the exports' CPU time down.
"""
import pytest
import torch

import dla_fast
from helpers import randomize_bn, rel_err

pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install onnx onnxscript onnxruntime)")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
ort = pytest.importorskip("onnxruntime", reason="the exported models are run by onnxruntime")

ALL = dla_fast.list_models()
TOL = 1e-4


def _export(model, x, path, dynamic_batch: bool):
    kw = dict(dynamic_shapes=({0: torch.export.Dim("batch")},)) if dynamic_batch else {}
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False, **kw)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, x):
    return [torch.from_numpy(y) for y in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]


# Each export takes 4-15 s of CPU: every variant is exported with a dynamic batch, and one of each block type
# (basic, bottleneck, grouped bottleneck, Res2Net) with a fixed one too.
FIXED = ("dla34", "dla46x_c", "dla60_res2next", "dla102")


@pytest.mark.parametrize("name", ALL)
def test_onnx_export_matches_eager(name, tmp_path):
    torch.manual_seed(ALL.index(name))
    m = randomize_bn(dla_fast.create_model(name)).eval()
    if name in FIXED:
        x = torch.randn(1, 3, 64, 64)
        sess = _export(m, x, tmp_path / "fixed.onnx", dynamic_batch=False)
        assert [d for d in sess.get_inputs()[0].shape] == [1, 3, 64, 64]
        with torch.no_grad():
            ref = m(x)
        (y,) = _run(sess, x)
        assert y.shape == ref.shape and rel_err(y, ref) <= TOL
    # dynamic batch: exported at batch 2, run at batches 1, 2 and 3
    sess = _export(m, torch.randn(2, 3, 63, 64), tmp_path / "dynamic.onnx", dynamic_batch=True)
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # a symbolic batch dimension
    for b in (1, 2, 3):
        x = torch.randn(b, 3, 63, 64)
        with torch.no_grad():
            ref = m(x)
        (y,) = _run(sess, x)
        assert y.shape == ref.shape == (b, 1000) and rel_err(y, ref) <= TOL, b


@pytest.mark.parametrize("name,out_indices", [("dla34", (0, 2, 5)), ("dla60_res2next", (1, 3, 4)),
                                              ("dla102x", (2, 5))])
def test_onnx_features_only(name, out_indices, tmp_path):
    m = randomize_bn(dla_fast.create_model(name, features_only=True, out_indices=out_indices)).eval()
    sess = _export(m, torch.randn(2, 3, 64, 64), tmp_path / "feats.onnx", dynamic_batch=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
    out = _run(sess, x)
    assert len(out) == len(ref) == len(out_indices)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and rel_err(a, b) <= TOL


def test_onnx_export_refuses_bad_size(tmp_path):
    m = dla_fast.create_model("dla46_c").eval()
    with pytest.raises(Exception, match=r"32k-1 or 32k") as e:
        torch.onnx.export(m, (torch.randn(1, 3, 65, 64),), str(tmp_path / "bad.onnx"), dynamo=True, verbose=False)
    assert isinstance(e.value, ValueError) or isinstance(e.value.__cause__, ValueError)
