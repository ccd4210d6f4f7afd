"""Every bad input gets a clear error: sizes, ranks, channels, names, checkpoint files."""
import pytest
import torch

import dla_fast
from dla_fast.models import CheckpointError
from helpers import randomize_bn


@pytest.fixture(scope="module")
def dla34():
    return dla_fast.create_model("dla34").eval()


@pytest.mark.parametrize("hw", [(65, 64), (64, 100), (33, 33), (16, 16), (62, 64)])
def test_invalid_spatial_size(dla34, hw):
    x = torch.randn(1, 3, *hw)
    with pytest.raises(ValueError, match=r"32k-1 or 32k"):
        dla34(x)
    with pytest.raises(ValueError, match=str(hw[0]) if hw[0] % 32 not in (0, 31) else str(hw[1])):
        dla34.forward_features(x)


def test_invalid_size_rejected_before_compute(dla34, monkeypatch):
    calls = []
    monkeypatch.setattr(dla34.base_layer[0], "forward", lambda x: calls.append(1) or x)
    with pytest.raises(ValueError):
        dla34(torch.randn(1, 3, 65, 64))
    assert not calls


def test_timm_fails_on_those_sizes_too():
    timm = pytest.importorskip("timm")
    ref = timm.create_model("dla34").eval()
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            ref(torch.randn(1, 3, 65, 64))


def test_features_only_checks_size():
    m = dla_fast.create_model("dla46_c", features_only=True).eval()
    with pytest.raises(ValueError, match="32k"):
        m(torch.randn(1, 3, 100, 64))


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 3, 64, 64)])
def test_wrong_rank(dla34, shape):
    with pytest.raises(ValueError, match="4-D"):
        dla34(torch.randn(*shape))


def test_wrong_channels(dla34):
    with pytest.raises(ValueError, match=r"3 input channels.*got an input with 1"):
        dla34(torch.randn(1, 1, 64, 64))
    m = dla_fast.create_model("dla34", in_chans=1).eval()
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_not_a_tensor(dla34):
    with pytest.raises(TypeError):
        dla34([[1.0]])


def test_unknown_model_lists_valid():
    with pytest.raises(ValueError, match=r"unknown model .dla35.; available: dla102.*dla169.*dla34"):
        dla_fast.create_model("dla35")


def test_bad_create_args():
    with pytest.raises(ValueError, match="global_pool"):
        dla_fast.create_model("dla34", global_pool="median")
    with pytest.raises(TypeError, match="unexpected"):
        dla_fast.create_model("dla34", pretraind=True)
    with pytest.raises(ValueError, match="out_indices"):
        dla_fast.create_model("dla34", features_only=True, out_indices=(6,))
    with pytest.raises(ValueError, match="features_only"):
        dla_fast.create_model("dla34", out_indices=(1,))


# ---- checkpoints ----

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


def test_num_classes_drops_classifier(ckpt_dir):
    src = dla_fast.create_model("dla46_c")
    p = _save_pth(ckpt_dir / "a.pth", src.state_dict())
    m = dla_fast.create_model("dla46_c", pretrained=p, num_classes=10)
    assert m.fc.out_channels == 10
    assert torch.equal(m.level5.root.conv.weight, src.level5.root.conv.weight)
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
