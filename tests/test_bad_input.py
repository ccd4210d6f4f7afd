"""Every bad input gets a clear error: sizes, ranks, channels, names (checkpoint files: test_checkpoints.py)."""
import pytest
import torch

import dla_fast


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
