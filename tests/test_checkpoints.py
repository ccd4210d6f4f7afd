"""Checkpoint files and state_dicts: formats, strictness, the classifier, all-or-nothing loading, bad tensors."""
import warnings

import pytest
import torch

import dla_fast
from dla_fast.models import CheckpointError
from dla_fast.models._weights import load_into
from helpers import randomize_bn


@pytest.fixture()
def ckpt_dir(tmp_path):
    return tmp_path


def _save_pth(path, sd):
    torch.save(sd, path)
    return str(path)


def test_load_pth_and_safetensors(ckpt_dir):
    src = randomize_bn(dla_fast.create_model("dla46_c")).eval()
    p1 = _save_pth(ckpt_dir / "a.pth", src.state_dict())
    p2 = _save_pth(ckpt_dir / "b.pt", {"state_dict": {"module." + k: v for k, v in src.state_dict().items()}})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = src(x)
        for p in (p1, p2):
            m = dla_fast.create_model("dla46_c", pretrained=p).eval()
            assert torch.equal(m(x), ref)
    st = pytest.importorskip("safetensors.torch")
    p3 = str(ckpt_dir / "c.safetensors")
    st.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, p3)
    m = dla_fast.create_model("dla46_c", pretrained=p3).eval()
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_num_classes_drops_classifier_and_says_so(ckpt_dir):
    src = dla_fast.create_model("dla46_c")
    p = _save_pth(ckpt_dir / "a.pth", src.state_dict())
    with pytest.warns(UserWarning, match=r"classifier \(fc.weight \(1000, 256, 1, 1\), fc.bias \(1000,\)\) is not "
                                         r"loaded.*num_classes=10"):
        m = dla_fast.create_model("dla46_c", pretrained=p, num_classes=10)
    assert m.fc.out_channels == 10
    assert torch.equal(m.level5.root.conv.weight, src.level5.root.conv.weight)
    with pytest.warns(UserWarning, match=r"fc.weight.*fc.bias.*not loaded.*num_classes=0"):
        m0 = dla_fast.create_model("dla46_c", pretrained=p, num_classes=0)
    assert isinstance(m0.fc, torch.nn.Identity)


def test_in_chans_adapts_stem(ckpt_dir):
    src = dla_fast.create_model("dla46_c")
    p = _save_pth(ckpt_dir / "a.pth", src.state_dict())
    m = dla_fast.create_model("dla46_c", pretrained=p, in_chans=1)
    assert torch.allclose(m.base_layer[0].weight, src.base_layer[0].weight.sum(1, keepdim=True))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        dla_fast.create_model("dla34", pretrained="/tmp/no_such.pth")


def test_corrupt_file(ckpt_dir):
    p = ckpt_dir / "bad.pth"
    p.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        dla_fast.create_model("dla34", pretrained=str(p))
    p2 = ckpt_dir / "bad.safetensors"
    p2.write_bytes(b"\x00\x01garbage")
    pytest.importorskip("safetensors")
    with pytest.raises(CheckpointError, match="could not read"):
        dla_fast.create_model("dla34", pretrained=str(p2))
    p3 = _save_pth(ckpt_dir / "list.pth", [1, 2, 3])
    with pytest.raises(CheckpointError, match="state_dict"):
        dla_fast.create_model("dla34", pretrained=p3)


def test_other_variant_checkpoint_loads_nothing(ckpt_dir):
    p = _save_pth(ckpt_dir / "dla60.pth", dla_fast.create_model("dla60").state_dict())
    m = dla_fast.create_model("dla102")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"nothing was loaded.*(missing keys|shape)") as e:
        dla_fast.models._weights.load_into(m, torch.load(p, weights_only=True))
    assert "level3.tree1.tree1" in str(e.value) or "level3" in str(e.value)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(CheckpointError, match="shape mismatches"):
        dla_fast.create_model("dla34", pretrained=_save_pth(ckpt_dir / "46.pth",
                                                             dla_fast.create_model("dla46_c").state_dict()))


def test_non_strict_still_rejects_shapes(ckpt_dir):
    sd = dla_fast.create_model("dla60").state_dict()
    sd.pop("level5.root.bn.bias")
    p = _save_pth(ckpt_dir / "partial.pth", sd)
    with pytest.raises(CheckpointError, match="missing keys: level5.root.bn.bias"):
        dla_fast.create_model("dla60", pretrained=p)
    m = dla_fast.create_model("dla60", pretrained=p, strict=False)
    assert torch.equal(m.level5.root.bn.weight, sd["level5.root.bn.weight"])


def test_pretrained_true_offline_says_how_to_pass_a_file(monkeypatch):
    timm = pytest.importorskip("timm")

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"pretrained='/path/to/model.safetensors'"):
        dla_fast.create_model("dla34", pretrained=True)


def test_pretrained_true_without_timm(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_timm(name, *a, **k):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(RuntimeError, match="pip install timm"):
        dla_fast.create_model("dla34", pretrained=True)


def test_pretrained_true_uses_hub_weights(monkeypatch):
    """With timm 'online' (a stand-in returning a known model), the weights arrive in our model."""
    timm = pytest.importorskip("timm")
    real = timm.create_model
    src = randomize_bn(real("dla46_c"))

    def fake_hub(name, pretrained=False, **kw):
        assert name == "dla46_c" and pretrained
        return src

    monkeypatch.setattr(timm, "create_model", fake_hub)
    m = dla_fast.create_model("dla46_c", pretrained=True)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)


# ---- the classifier: whole or nothing, and said ----

def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, before):
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("key", ["fc.bias", "fc.weight"])
def test_half_a_classifier_is_never_loaded(ckpt_dir, key):
    sd = randomize_bn(dla_fast.create_model("dla46_c")).state_dict()
    sd[key] = torch.randn(10, *sd[key].shape[1:])
    m = dla_fast.create_model("dla46_c")
    before = _snapshot(m)
    with pytest.raises(CheckpointError, match=r"nothing was loaded.*the classifier does not fit: checkpoint "
                                              r"fc.weight .*fc.bias .* vs model fc.weight \(1000, 256, 1, 1\)"):
        load_into(m, sd)
    _assert_unchanged(m, before)
    with pytest.raises(CheckpointError, match="the classifier does not fit"):
        dla_fast.create_model("dla46_c", pretrained=_save_pth(ckpt_dir / "half.pth", sd))
    with pytest.warns(UserWarning, match=r"its classifier \(fc.weight .*, fc.bias .*\) does not fit the model's .*"
                                         r"not loaded \(strict=False\)"):
        load_into(m, sd, strict=False)
    # the backbone comes from the checkpoint, the whole head stays the model's own
    assert torch.equal(m.level5.root.conv.weight, sd["level5.root.conv.weight"])
    assert torch.equal(m.fc.weight, before["fc.weight"]) and torch.equal(m.fc.bias, before["fc.bias"])


def test_checkpoint_for_other_num_classes(ckpt_dir):
    src = randomize_bn(dla_fast.create_model("dla46_c", num_classes=10))
    p = _save_pth(ckpt_dir / "ten.pth", src.state_dict())
    with pytest.raises(CheckpointError, match=r"classifier does not fit: checkpoint fc.weight \(10, 256, 1, 1\), "
                                              r"fc.bias \(10,\) vs model .*pass num_classes=10 to load it"):
        dla_fast.create_model("dla46_c", pretrained=p)
    with pytest.warns(UserWarning, match=r"fc.weight \(10, 256, 1, 1\), fc.bias \(10,\)\) does not fit"):
        m = dla_fast.create_model("dla46_c", pretrained=p, strict=False)
    assert m.fc.out_channels == 1000 and torch.equal(m.level5.root.conv.weight, src.level5.root.conv.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m10 = dla_fast.create_model("dla46_c", pretrained=p, num_classes=10)
        feats = dla_fast.create_model("dla46_c", pretrained=p, features_only=True)  # has no head to fill
    for k, v in src.state_dict().items():
        assert torch.equal(m10.state_dict()[k], v), k
    assert torch.equal(feats.level5.root.conv.weight, src.level5.root.conv.weight)
    with pytest.warns(UserWarning, match=r"fc.weight \(10, 256, 1, 1\), fc.bias \(10,\)\) is not loaded: the model "
                                         r"was built with num_classes=5 \(fc.weight \(5, 256, 1, 1\)"):
        dla_fast.create_model("dla46_c", pretrained=p, num_classes=5)


def test_backbone_only_checkpoint_with_new_head(ckpt_dir):
    src = randomize_bn(dla_fast.create_model("dla46_c", num_classes=0))
    p = _save_pth(ckpt_dir / "backbone.pth", src.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = dla_fast.create_model("dla46_c", pretrained=p, num_classes=7)
    assert m.fc.out_channels == 7 and torch.equal(m.level5.root.bn.running_var, src.level5.root.bn.running_var)
    with pytest.raises(CheckpointError, match="missing keys: fc.weight, fc.bias"):
        dla_fast.create_model("dla46_c", pretrained=p)  # the default 1000-class head has nothing to load


def test_classifier_mode_is_checked():
    with pytest.raises(ValueError, match="classifier must be one of"):
        load_into(dla_fast.create_model("dla46_c"), {}, classifier="drop")


# ---- BN counters, bad tensors ----

def test_checkpoint_without_num_batches_tracked(ckpt_dir):
    src = randomize_bn(dla_fast.create_model("dla46_c"))
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dla_fast.create_model("dla46_c").load_state_dict(sd, strict=True)  # torch's strict load accepts it
    m = dla_fast.create_model("dla46_c")
    with torch.no_grad():
        m.level2.root.bn.num_batches_tracked.fill_(7)
    load_into(m, sd)
    assert m.level2.root.bn.num_batches_tracked.item() == 7  # counters keep their values
    for k, v in sd.items():
        assert torch.equal(m.state_dict()[k], v), k
    m2 = dla_fast.create_model("dla46_c", pretrained=_save_pth(ckpt_dir / "nobt.pth", sd))
    assert torch.equal(m2.level5.root.bn.running_mean, src.level5.root.bn.running_mean)


BAD_TENSORS = {
    "sparse": (lambda w: w.to_sparse(), r"a torch.sparse_coo tensor \(only dense tensors"),
    "csr": (lambda w: w.flatten(1).to_sparse_csr(), "a torch.sparse_csr tensor"),
    "meta": (lambda w: torch.empty_like(w, device="meta"), r"a meta tensor \(it has a shape but no data\)"),
    "int": (lambda w: (w * 100).long(), "dtype torch.int64 where the model has a floating-point torch.float32"),
    "bool": (lambda w: w > 0, "dtype torch.bool"),
}


@pytest.mark.parametrize("kind", list(BAD_TENSORS))
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants", "ignore:Sparse CSR tensor support")
def test_bad_tensors_refused_before_anything_is_written(ckpt_dir, kind, strict):
    make, msg = BAD_TENSORS[kind]
    sd = randomize_bn(dla_fast.create_model("dla46_c")).state_dict()
    key = "level5.root.conv.weight"  # late in the order: the keys before it would be written first
    sd[key] = make(sd[key])
    m = dla_fast.create_model("dla46_c")
    before = _snapshot(m)
    with pytest.raises(CheckpointError, match=rf"cannot be loaded into dla46_c; nothing was loaded: {key}: {msg}"):
        load_into(m, sd, strict=strict)
    _assert_unchanged(m, before)
    if kind in ("sparse", "meta"):  # torch.save keeps these; the file path reports the same
        with pytest.raises(CheckpointError, match=rf"{key}: {msg}"):
            dla_fast.create_model("dla46_c", pretrained=_save_pth(ckpt_dir / f"{kind}.pth", sd), strict=strict)


def test_float_batch_counter_refused():
    sd = dla_fast.create_model("dla46_c").state_dict()
    sd["level1.1.num_batches_tracked"] = torch.tensor(3.0)
    with pytest.raises(CheckpointError, match=r"level1.1.num_batches_tracked: dtype torch.float32 where the model "
                                              r"has an integer torch.int64"):
        load_into(dla_fast.create_model("dla46_c"), sd)


def test_half_precision_checkpoint_loads():
    src = randomize_bn(dla_fast.create_model("dla46_c"))
    m = dla_fast.create_model("dla46_c")
    load_into(m, {k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()})
    assert m.fc.weight.dtype == torch.float32
    assert torch.equal(m.fc.weight, src.fc.weight.half().float())


# ---- files ----

@pytest.mark.parametrize("ext", [".pth", ".safetensors", ".bin"])
def test_empty_file_says_so(ckpt_dir, ext):
    p = ckpt_dir / f"empty{ext}"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        dla_fast.create_model("dla34", pretrained=str(p))


def test_truncated_file_names_the_cause(ckpt_dir):
    p = ckpt_dir / "whole.pth"
    torch.save(dla_fast.create_model("dla46_c").state_dict(), p)
    cut = ckpt_dir / "cut.pth"
    cut.write_bytes(p.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=r"could not read checkpoint .*cut.pth.*: RuntimeError: \S"):
        dla_fast.create_model("dla46_c", pretrained=str(cut))


@pytest.mark.parametrize("name", ["m.SAFETENSORS", "m.SafeTensors"])
def test_safetensors_extension_any_case(ckpt_dir, name):
    st = pytest.importorskip("safetensors.torch")
    src = randomize_bn(dla_fast.create_model("dla46_c"))
    p = str(ckpt_dir / name)
    st.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, p)
    m = dla_fast.create_model("dla46_c", pretrained=p)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
