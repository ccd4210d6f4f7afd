"""timm's model contract beyond the forward pass, on all 12 variants: FX tracing, TorchScript, cfgs and
feature_info, forward_intermediates / prune_intermediate_layers, gradient checkpointing, group_matcher."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import dla_fast
from dla_fast.models import DlaFeatures, FeatureInfo, feature_take_indices
from helpers import randomize_bn, rel_err

try:
    import timm
except ImportError:  # the contract tests against timm skip; the rest runs
    timm = None

ALL = dla_fast.list_models()
needs_timm = pytest.mark.skipif(timm is None, reason="timm is the reference for this test (pip install timm)")
# torch deprecates TorchScript (the contract still has it), and scripting an FX GraphModule warns from torch's own
# GraphModule.__init__.
pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support instance-level")]


@pytest.fixture(scope="module", params=ALL)
def model(request):
    """(name, our classifier with random weights and BN statistics, eval mode); tests must not modify it."""
    torch.manual_seed(ALL.index(request.param))
    return request.param, randomize_bn(dla_fast.create_model(request.param, num_classes=11)).eval()


def _grads(module: nn.Module, x: torch.Tensor):
    module.zero_grad(set_to_none=True)
    out = module(x)
    outs = out if isinstance(out, list) else [out]
    sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


# ---- FX ----

# The features_only module adds one forward (the same for every variant) around the same blocks; it is traced
# and scripted on variants covering every block type and tree depth.
FEATURES_SUBSET = ("dla34", "dla46x_c", "dla60_res2net", "dla169")


def _check_fx(m: nn.Module, features: bool) -> None:
    g = torch.fx.symbolic_trace(m)
    x = torch.randn(2, 3, 32, 32)
    out_e, grad_e = _grads(m, x)
    out_g, grad_g = _grads(g, x)
    assert len(out_e) == len(out_g) == (3 if features else 1)
    for a, b in zip(out_g, out_e):
        assert torch.equal(a, b)
    assert grad_e.keys() == grad_g.keys() == {n for n, _ in m.named_parameters()}
    for k in grad_e:
        assert torch.equal(grad_g[k], grad_e[k]), k
    m.eval()
    g.eval()
    y = torch.randn(1, 3, 63, 64)
    with torch.no_grad():
        for a, b in zip(g(y) if features else [g(y)], m(y) if features else [m(y)]):
            assert torch.equal(a, b)


def test_fx_trace_forward_and_backward_equal_eager(model):
    """Traced in training mode: outputs and every parameter's gradient equal eager's; then in eval mode."""
    name, m = model
    m = copy.deepcopy(m).train()
    _check_fx(m, features=False)
    if name in FEATURES_SUBSET:
        _check_fx(DlaFeatures(m.train(), (0, 2, 4)).train(), features=True)


def test_fx_graph_still_checks_the_input():
    g = torch.fx.symbolic_trace(dla_fast.create_model("dla34").eval())
    assert any(n.op == "call_function" and n.target is dla_fast.models.dla.check_input for n in g.graph.nodes)
    with pytest.raises(ValueError, match=r"H=65.*32k-1 or 32k"):
        g(torch.randn(1, 3, 65, 64))
    with pytest.raises(ValueError, match="input channels"):
        g(torch.randn(1, 1, 64, 64))
    g.graph.eliminate_dead_code()  # the check feeds the data path: it survives dead-code elimination
    g.recompile()
    with pytest.raises(ValueError, match="32k"):
        g(torch.randn(1, 3, 64, 100))


@pytest.mark.parametrize("name", ["dla34", "dla60_res2next"])
def test_torchvision_feature_extractor(name):
    fx = pytest.importorskip("torchvision.models.feature_extraction")
    m = randomize_bn(dla_fast.create_model(name)).eval()
    ext = fx.create_feature_extractor(m, return_nodes={"level1": "a", "level3": "b", "level5": "c"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = ext(x)
        ref = m.forward_intermediates(x, indices=[1, 3, 5], intermediates_only=True)
    assert list(out) == ["a", "b", "c"]
    for a, b in zip(out.values(), ref):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="32k"):
        ext(torch.randn(1, 3, 65, 64))


@needs_timm
@pytest.mark.parametrize("name", ["dla46x_c", "dla102"])
def test_timm_fx_feature_extractors(name):
    fxmod = pytest.importorskip("timm.models._features_fx")
    m = randomize_bn(dla_fast.create_model(name)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = m.forward_intermediates(x, intermediates_only=True)
        ext = fxmod.create_feature_extractor(m, {"level2": "l2", "level4": "l4"})
        out = ext(x)
        assert torch.equal(out["l2"], ref[2]) and torch.equal(out["l4"], ref[4])
        net = fxmod.FeatureGraphNet(m, out_indices=(1, 3, 5))  # timm's features_only feature_cls='fx'
        assert net.feature_info.channels() == [m.channels[i] for i in (1, 3, 5)]
        for a, b in zip(net(x), [ref[1], ref[3], ref[5]]):
            assert torch.equal(a, b)


# ---- TorchScript ----

def test_torchscript_equals_eager(model):
    name, m = model
    mods = [m]
    if name in FEATURES_SUBSET:
        mods.append(DlaFeatures(m, (1, 3, 5) if name != "dla34" else (0, 2)).eval())
    for mod in mods:
        s = torch.jit.script(mod)
        x = torch.randn(2, 3, 63, 64)
        with torch.no_grad():
            ref, out = mod(x), s(x)
        if isinstance(mod, DlaFeatures):
            assert len(out) == len(ref) == len(mod.out_indices)
        else:
            ref, out = [ref], [out]
        for a, b in zip(out, ref):
            assert a.shape == b.shape and rel_err(a, b) <= 1e-6
        # the scripted model keeps the size rule
        with pytest.raises(torch.jit.Error, match=r"W=66.*32k-1 or 32k"):
            s(torch.randn(1, 3, 64, 66))


def test_torchscript_checks_every_input_rule(tmp_path):
    s = torch.jit.script(dla_fast.create_model("dla46_c").eval())
    with pytest.raises(torch.jit.Error, match="4-D input"):
        s(torch.randn(3, 64, 64))
    with pytest.raises(torch.jit.Error, match=r"takes 3 input channels.*got an input with 2"):
        s(torch.randn(1, 2, 64, 64))
    with pytest.raises(torch.jit.Error, match=r"e\.g\. to 96x64"):
        s(torch.randn(1, 3, 100, 64))
    # saved and reloaded, the check is still there
    torch.jit.save(s, str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    with pytest.raises(torch.jit.Error, match="32k"):
        loaded(torch.randn(1, 3, 100, 64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), s(x))


def test_jit_trace_checks_the_example_quietly():
    m = randomize_bn(dla_fast.create_model("dla34")).eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        t = torch.jit.trace(m, x)
        with pytest.raises(ValueError, match=r"\(65, 64\) \(H=65\).*e\.g\. to 64x64"):
            torch.jit.trace(m, torch.randn(1, 3, 65, 64))
    with torch.no_grad():
        assert rel_err(t(x), m(x)) <= 1e-6


def test_torchscript_of_fx_graph():
    m = randomize_bn(dla_fast.create_model("dla60_res2net")).eval()
    s = torch.jit.script(torch.fx.symbolic_trace(m))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(s(x), m(x)) <= 1e-6
    with pytest.raises(torch.jit.Error, match="32k"):
        s(torch.randn(1, 3, 64, 40))


# ---- cfgs and feature_info ----

OUT_INDICES = [None, (3, 1), (-1, -2), 2, [5, 0, 4]]


@needs_timm
def test_cfgs_and_feature_info_match_timm(model):
    name, m = model
    ref = timm.create_model(name, num_classes=11, device="meta").eval()
    assert m.pretrained_cfg == ref.pretrained_cfg
    assert m.default_cfg == ref.default_cfg
    assert m.feature_info == ref.feature_info
    for oi in OUT_INDICES:
        kw = {} if oi is None else {"out_indices": oi}
        tf = timm.create_model(name, features_only=True, device="meta", **kw).eval()
        of = DlaFeatures(m, oi)
        assert of.pretrained_cfg == tf.pretrained_cfg and of.default_cfg == tf.default_cfg
        assert "num_classes" not in of.pretrained_cfg and "classifier" not in of.pretrained_cfg
        fo, ft = of.feature_info, tf.feature_info
        assert isinstance(fo, FeatureInfo)
        assert fo.out_indices == ft.out_indices, oi
        assert len(fo) == len(ft) == 6
        assert [fo[i] for i in range(6)] == [ft[i] for i in range(6)] == list(fo)
        assert fo.get_dicts() == ft.get_dicts()
        assert fo.channels() == ft.channels() and fo.reduction() == ft.reduction()
        assert fo.module_name() == ft.module_name()
        assert fo.channels(3) == ft.channels(3) and fo.reduction([0, 5]) == ft.reduction([0, 5])
        assert fo.get("module", (1, 2)) == ft.get("module", (1, 2))
        assert fo.get_dicts(keys=["num_chs", "module"]) == ft.get_dicts(keys=["num_chs", "module"])
        assert fo.get_dicts(keys=["reduction"], idx=4) == ft.get_dicts(keys=["reduction"], idx=4)
        assert fo.get_dicts(idx=[2, 1]) == ft.get_dicts(idx=[2, 1])
        assert fo.from_other(2).channels() == ft.from_other(2).channels()
        # the maps: timm returns them in level order whatever the order of out_indices; so do we
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            shapes = [tuple(t.shape) for t in of(x)]
        assert shapes == [tuple(t.shape) for t in tf(x.to("meta"))], oi
        assert of.out_indices == tuple(sorted(of.out_indices))
        assert [s[1] for s in shapes] == [m.channels[i] for i in of.out_indices]


def test_features_only_state_dict_unchanged_by_identity_levels():
    full = dla_fast.create_model("dla60")
    f = dla_fast.create_model("dla60", features_only=True, out_indices=(1, 2))
    assert isinstance(f.level3, nn.Identity) and isinstance(f.level5, nn.Identity)
    keys = [k for k in full.state_dict() if k.split(".")[0] in ("base_layer", "level0", "level1", "level2")]
    assert list(f.state_dict()) == keys
    assert f.out_indices == (1, 2) and f.channels == full.channels and f.in_chans == 3


def test_features_only_out_indices_forms():
    m = dla_fast.create_model("dla34", features_only=True, out_indices=2)
    assert m.out_indices == (4, 5) and m.feature_info.out_indices == (-2, -1)
    assert m.feature_info.channels() == [256, 512]
    m = dla_fast.create_model("dla34", features_only=True, out_indices=[-1, 1])
    assert m.out_indices == (1, 5) and m.feature_info.out_indices == (-1, 1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert [t.shape[1] for t in m(x)] == [32, 512]
    for bad in [(1, -5), (6,), (-7,), 0, 7, (), ("a",), (1.5,)]:
        with pytest.raises(ValueError, match="out_indices"):
            dla_fast.create_model("dla34", features_only=True, out_indices=bad)


# ---- forward_intermediates / prune_intermediate_layers ----

def test_feature_take_indices():
    assert feature_take_indices(6) == ([0, 1, 2, 3, 4, 5], 5)
    assert feature_take_indices(6, 2) == ([4, 5], 5)
    assert feature_take_indices(6, [1, -1]) == ([1, 5], 5)
    assert feature_take_indices(6, (3, 0)) == ([3, 0], 3)
    assert feature_take_indices(6, torch.tensor(3)) == ([3, 4, 5], 5)
    assert dla_fast.models.dla.feature_take_indices is feature_take_indices
    for bad, err, msg in [(0, ValueError, "last 0 levels"), (7, ValueError, "there are 6"),
                          ([6], ValueError, "level index 6 is out of range"), ([-7], ValueError, "out of range"),
                          ([], ValueError, "empty"), ("12", TypeError, "list of level indices"),
                          (1.5, TypeError, "list of level indices"), ([1.0], TypeError, "must be ints"),
                          (True, TypeError, "list of level indices"), ([True], TypeError, "must be ints")]:
        with pytest.raises(err, match=msg):
            feature_take_indices(6, bad)


def test_forward_intermediates(model):
    name, m = model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        levels = DlaFeatures(m, range(6))(x)
        final = m.forward_features(x)
        f, maps = m.forward_intermediates(x)
        assert torch.equal(f, final) and len(maps) == 6
        assert all(torch.equal(a, b) for a, b in zip(maps, levels))
        for idx, want in [(2, [4, 5]), ([1, -1], [1, 5]), ((0, 3), [0, 3]), ([5, 2], [2, 5]), (6, range(6))]:
            maps = m.forward_intermediates(x, indices=idx, intermediates_only=True)
            assert isinstance(maps, list) and len(maps) == len(want), idx
            assert all(torch.equal(a, levels[i]) for a, i in zip(maps, want)), idx
        f, maps = m.forward_intermediates(x, indices=[2], stop_early=True)
        assert torch.equal(f, levels[2]) and torch.equal(maps[0], levels[2])
        f, maps = m.forward_intermediates(x, indices=[2], stop_early=False, norm=True)
        assert torch.equal(f, final)
        assert torch.equal(m.forward_head(f), m(x))


def test_forward_intermediates_errors():
    m = dla_fast.create_model("dla34").eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"output_fmt='NHWC' is not supported.*NCHW"):
        m.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, indices=[6])
    with pytest.raises(ValueError, match="32k"):
        m.forward_intermediates(torch.randn(1, 3, 65, 64))
    with pytest.raises(ValueError, match="out of range"):
        m.prune_intermediate_layers([9])


@needs_timm
@pytest.mark.parametrize("name", ["dla34", "dla46x_c", "dla60_res2next"])
def test_forward_intermediates_and_prune_match_timm(name):
    ref = randomize_bn(timm.create_model(name)).eval()
    if not hasattr(ref, "forward_intermediates"):
        pytest.skip(f"timm {timm.__version__}'s DLA has no forward_intermediates (the semantics test above still runs)")
    ours = dla_fast.from_timm(ref)
    x = torch.randn(2, 3, 63, 64)
    with torch.no_grad():
        for kw in [{}, dict(indices=2), dict(indices=[0, -3]), dict(indices=[3], stop_early=True),
                   dict(indices=(1, 4), intermediates_only=True)]:
            a, b = ours.forward_intermediates(x, **kw), ref.forward_intermediates(x, **kw)
            if not kw.get("intermediates_only"):
                assert rel_err(a[0], b[0]) <= 1e-6
                a, b = a[1], b[1]
            assert len(a) == len(b) and all(rel_err(p, q) <= 1e-6 for p, q in zip(a, b)), kw
    for args, kw in [((), {}), (([1, 3],), {}), ((2,), dict(prune_head=False)), (([-4],), dict(prune_head=False))]:
        o, r = copy.deepcopy(ours), copy.deepcopy(ref)
        assert o.prune_intermediate_layers(*args, **kw) == r.prune_intermediate_layers(*args, **kw)
        assert (o.num_features, o.head_hidden_size, o.num_classes) == (r.num_features, r.head_hidden_size,
                                                                        r.num_classes)
        assert list(o.state_dict()) == list(r.state_dict())
        assert [type(getattr(o, f"level{i}")).__name__ for i in range(6)] == \
            [type(getattr(r, f"level{i}")).__name__ for i in range(6)]
        with torch.no_grad():
            assert rel_err(o(x), r(x)) <= 1e-6
            assert rel_err(o.forward_features(x), r.forward_features(x)) <= 1e-6


def test_prune_intermediate_layers():
    m = randomize_bn(dla_fast.create_model("dla60")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = m.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert m.prune_intermediate_layers([1, -3]) == [1, 3]
    assert isinstance(m.level4, nn.Identity) and isinstance(m.level5, nn.Identity)
    assert m.num_features == m.head_hidden_size == 256 and m.num_classes == 0
    assert not any(k.startswith(("level4", "level5", "fc")) for k in m.state_dict())
    with torch.no_grad():
        got = m.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(m(x), want[1])  # no head, no pooling: forward gives the level3 map
    m2 = dla_fast.create_model("dla34")
    assert m2.prune_intermediate_layers(1, prune_head=False) == [5]
    assert m2.num_classes == 1000 and m2.fc.out_channels == 1000  # nothing to prune: the head stays


# ---- gradient checkpointing ----

def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages the autograd graph keeps for the backward pass of ``model(x)``."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("name", ["dla34", "dla60_res2next", "dla102"])
@pytest.mark.parametrize("features", [False, True], ids=["plain", "features"])
def test_grad_checkpointing_same_gradients_and_running_stats(name, features):
    torch.manual_seed(0)
    plain = randomize_bn(dla_fast.create_model(name, num_classes=7)).double().train()
    if features:
        plain = DlaFeatures(plain, (1, 3, 4))
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    assert ckpt.grad_checkpointing
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out_p, grad_p = _grads(plain, x)
    out_c, grad_c = _grads(ckpt, x)
    for a, b in zip(out_c, out_p):
        assert rel_err(a, b) <= 1e-13
    assert grad_p.keys() == grad_c.keys() == {n for n, _ in plain.named_parameters()}
    for k in grad_p:
        assert rel_err(grad_c[k], grad_p[k]) <= 1e-12, k
    # BatchNorm's running statistics and batch counters are updated once, not again by the recomputation
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), k


def test_grad_checkpointing_saves_memory():
    """The figures (fp32, dla34, 1x3x224x224): 105 MiB kept for backward plainly, 11.5 MiB checkpointed."""
    m = dla_fast.create_model("dla34").train()
    x = torch.randn(1, 3, 224, 224)
    plain = _saved_bytes(m, x)
    m.set_grad_checkpointing()
    ckpt = _saved_bytes(m, x)
    assert ckpt < 0.2 * plain, (plain, ckpt)
    # only in training with autograd on
    with torch.no_grad():
        assert _saved_bytes(m, x) == 0
    m.eval()
    eval_ckpt = _saved_bytes(m, x)
    m.set_grad_checkpointing(False)
    assert _saved_bytes(m, x) == eval_ckpt > 0.8 * plain
    m.train()
    assert _saved_bytes(m, x) == plain


def test_grad_checkpointing_forward_intermediates():
    torch.manual_seed(0)
    a = randomize_bn(dla_fast.create_model("dla46_c")).double().train()
    b = copy.deepcopy(a)
    b.set_grad_checkpointing()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for m in (a, b):
        m.zero_grad()
        f, maps = m.forward_intermediates(x, indices=[1, 4])
        (f.sum() + sum((t * t).mean() for t in maps)).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if n.startswith("fc."):
            assert p.grad is None and q.grad is None
        else:
            assert rel_err(q.grad, p.grad) <= 1e-12, n
    assert _saved_bytes(lambda t: b.forward_intermediates(t)[0], x) < \
        0.5 * _saved_bytes(lambda t: a.forward_intermediates(t)[0], x)


def test_grad_checkpointing_skipped_by_fx_and_torchscript():
    m = randomize_bn(dla_fast.create_model("dla60x_c")).train()
    m.set_grad_checkpointing()
    g = torch.fx.symbolic_trace(m)
    assert "checkpoint" not in g.code
    s = torch.jit.script(m)
    f = torch.jit.script(DlaFeatures(m, (2, 3)))
    m.eval()
    g.eval()
    s.eval()
    f.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(g(x), m(x))
        assert rel_err(s(x), m(x)) <= 1e-6
        assert rel_err(f(x)[1], m.forward_intermediates(x, [3], intermediates_only=True)[0]) <= 1e-6


@needs_timm
def test_group_matcher_groups_like_timm():
    ours = dla_fast.create_model("dla102")
    ref = timm.create_model("dla102", device="meta")
    for coarse in (False, True):
        assert timm.models.group_parameters(ours, ours.group_matcher(coarse)) == \
            timm.models.group_parameters(ref, ref.group_matcher(coarse))
