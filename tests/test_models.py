"""timm parity of the 12 DLA variants: state_dict, outputs, features, head API, training."""
import pytest
import torch

import dla_fast
from helpers import randomize_bn, rel_err, timm_or_skip

timm = timm_or_skip()

ALL = dla_fast.list_models()
SIZES = [(64, 64), (96, 128), (63, 95)]


def test_twelve_variants():
    assert ALL == sorted(["dla34", "dla46_c", "dla46x_c", "dla60", "dla60x", "dla60x_c", "dla60_res2net",
                          "dla60_res2next", "dla102", "dla102x", "dla102x2", "dla169"])
    assert dla_fast.list_models("dla60*") == ["dla60", "dla60_res2net", "dla60_res2next", "dla60x", "dla60x_c"]
    assert dla_fast.list_models("nope*") == []


@pytest.fixture(scope="module", params=ALL)
def pair(request):
    """(name, timm model, our model) with the same random weights and randomised BN, eval mode."""
    name = request.param
    torch.manual_seed(hash(name) % 1000)
    ref = randomize_bn(timm.create_model(name), seed=1).eval()
    ours = dla_fast.create_model(name).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return name, ref, ours


def test_state_dict_keys_order_shapes(pair):
    name, ref, ours = pair
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
    # strict loading both ways
    fresh_timm = timm.create_model(name)
    fresh_timm.load_state_dict(ours.state_dict(), strict=True)
    for k, v in fresh_timm.state_dict().items():
        assert torch.equal(v, b[k]), k


@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_outputs_match_timm(pair, hw):
    _, ref, ours = pair
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        y_ref, y = ref(x), ours(x)
    assert y.shape == y_ref.shape == (2, 1000)
    assert rel_err(y, y_ref) <= 1e-6
    with torch.no_grad():
        f_ref, f = ref.forward_features(x), ours.forward_features(x)
    assert rel_err(f, f_ref) <= 1e-6
    with torch.no_grad():
        assert rel_err(ours.forward_head(f, pre_logits=True), ref.forward_head(f_ref, pre_logits=True)) <= 1e-6


def test_batch1_and_size_rule_matches_timm(pair):
    _, ref, ours = pair
    for hw in [(31, 32), (32, 63)]:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            assert rel_err(ours(x), ref(x)) <= 1e-6


@pytest.mark.parametrize("name", ["dla34", "dla60_res2next", "dla46x_c"])
@pytest.mark.parametrize("out_indices", [None, (0, 2), (3,)])
def test_features_only(name, out_indices):
    kw = {} if out_indices is None else {"out_indices": out_indices}
    ref = randomize_bn(timm.create_model(name, features_only=True, **kw)).eval()
    ours = dla_fast.create_model(name, features_only=True, **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.feature_info.channels() == ref.feature_info.channels()
    assert ours.feature_info.reduction() == ref.feature_info.reduction()
    assert ours.feature_info.module_name() == ref.feature_info.module_name()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fr, fo = ref(x), ours(x)
    assert len(fr) == len(fo)
    for a, b, red in zip(fo, fr, ours.feature_info.reduction()):
        assert a.shape == b.shape
        assert a.shape[-2:] == (64 // red, 96 // red)
        assert rel_err(a, b) <= 1e-6


def test_classifier_api():
    m = dla_fast.create_model("dla34", num_classes=0).eval()
    assert isinstance(m.get_classifier(), torch.nn.Identity)
    assert m.num_features == 512
    x = torch.randn(2, 3, 64, 64)
    assert m(x).shape == (2, 512)
    m.reset_classifier(10)
    assert m(x).shape == (2, 10) and m.get_classifier().out_channels == 10
    m.reset_classifier(5, global_pool="catavgmax")
    assert m.get_classifier().in_channels == 1024 and m(x).shape == (2, 5)
    m.reset_classifier(7, global_pool="")
    assert m(x).shape == (2, 7, 2, 2)
    assert m.pretrained_cfg["input_size"] == (3, 224, 224)
    assert m.pretrained_cfg["crop_pct"] == 0.875 and m.pretrained_cfg["interpolation"] == "bilinear"
    assert m.pretrained_cfg["mean"] == (0.485, 0.456, 0.406) and m.pretrained_cfg["std"] == (0.229, 0.224, 0.225)
    assert [d["reduction"] for d in m.feature_info] == [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax", ""])
def test_global_pool_types_match_timm(pool):
    ref = randomize_bn(timm.create_model("dla46_c", global_pool=pool, num_classes=13)).eval()
    ours = dla_fast.create_model("dla46_c", global_pool=pool, num_classes=13).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-6


@pytest.mark.parametrize("name", ALL)
def test_backward_every_parameter_gets_grad(name):
    m = dla_fast.create_model(name, num_classes=7).train()
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_train_mode_matches_timm():
    ref = timm.create_model("dla34").train()
    ours = dla_fast.create_model("dla34").train()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(ours(x), ref(x)) <= 1e-6
    # running stats were updated the same way
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-7), k


def test_from_timm_copies_without_touching():
    ref = randomize_bn(timm.create_model("dla60x_c", num_classes=11)).eval()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ours = dla_fast.from_timm(ref)
    assert isinstance(ours, dla_fast.models.DLA) and not ours.training
    assert ours.pretrained_cfg["architecture"] == "dla60x_c"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-6
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k])


def test_from_timm_infers_variant_without_cfg():
    ref = timm.create_model("dla102x")
    ref.pretrained_cfg = {}
    ref.default_cfg = {}
    assert dla_fast.from_timm(ref).pretrained_cfg["architecture"] == "dla102x"


def test_from_timm_rejects_other_models():
    with pytest.raises(TypeError, match="timm DLA"):
        dla_fast.from_timm(torch.nn.Linear(2, 2))


def test_features_only_and_head_api_every_variant(pair):
    """features_only maps and the classifier API on every variant, against timm."""
    name, ref, ours = pair
    x = torch.randn(1, 3, 64, 64)
    tf = timm.create_model(name, features_only=True).eval()
    of = dla_fast.create_model(name, features_only=True).eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    tf.load_state_dict(sd, strict=True)
    of.load_state_dict(sd, strict=True)
    assert of.feature_info.channels() == tf.feature_info.channels()
    assert of.feature_info.reduction() == tf.feature_info.reduction()
    with torch.no_grad():
        for a, b in zip(of(x), tf(x)):
            assert a.shape == b.shape and rel_err(a, b) <= 1e-6
    headless = dla_fast.create_model(name, num_classes=0).eval()
    headless.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert rel_err(headless(x), ref.forward_head(ref.forward_features(x), pre_logits=True)) <= 1e-6
    headless.reset_classifier(5)
    assert headless(x).shape == (1, 5) and headless.num_classes == 5
