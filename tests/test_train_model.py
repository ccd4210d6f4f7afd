"""Fused training of whole models (``set_fused_training``): the same numbers as the modules against float64, the
model's own parameters, buffers and state_dict, the fallbacks, checkpointing, tracing and scripting.

On the CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in float32 with
``backend="triton"`` (``auto`` keeps the CPU on the modules); the ``cuda`` tests train all 12 variants under bf16
and fp16 autocast and under torch.compile.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import dla_fast
from dla_fast.train import model as fused_model
from dla_fast.verify import FLOOR, RATIO, calibrated_random_weights, rel_err
from test_train_ops import AddCounter

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
needs_interp = pytest.mark.skipif(not INTERP, reason="needs TRITON_INTERPRET=1 (the kernels on the CPU)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA or INTERP, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


def _model(name="dla46_c", seed=0, **kw):
    torch.manual_seed(seed)
    return calibrated_random_weights(dla_fast.create_model(name, **kw), seed).train()


def _step(model, x, target, amp=None):
    """Forward, loss, backward under autocast to ``amp``: the output, and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        out = model(x)
    loss = F.cross_entropy(out.float(), target)
    loss.backward()
    return out.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _buffers(model):
    return [b.detach().clone() for b in model.buffers()]


def _compare(name, got, eager, truth, floor):
    """Each tensor of ``got`` within RATIO x eager's error against float64 plus ``floor``."""
    bad = []
    for i, (g, e, t) in enumerate(zip(got, eager, truth)):
        if t.dtype == torch.long:  # num_batches_tracked: exact
            if not torch.equal(g.cpu(), t.cpu()):
                bad.append((i, "count", g.item(), t.item()))
            continue
        eg, ee = rel_err(g, t), rel_err(e, t)
        if not eg <= RATIO * ee + floor:
            bad.append((i, tuple(t.shape), eg, ee))
    assert not bad, f"{name}: {len(bad)} tensors beyond {RATIO}x eager's error + {floor}: {bad[:6]}"


def _three(model, backend):
    fused = copy.deepcopy(model).set_fused_training(True, backend=backend)
    return fused, copy.deepcopy(model), copy.deepcopy(model).double()


# ------------------------------------------------------------------------------------------ API and fallbacks

def test_set_fused_training_api():
    m = dla_fast.create_model("dla34")
    keys = list(m.state_dict())
    assert m.fused_training is None
    assert m.set_fused_training() is m and m.fused_training == "auto"
    assert m.set_fused_training(True, backend="triton").fused_training == "triton"
    assert list(m.state_dict()) == keys  # a mode, not a structure: timm's state_dict as it was
    assert m.set_fused_training(False).fused_training is None
    assert not m.fused_training_save_memory
    assert m.set_fused_training(save_memory=True).fused_training_save_memory
    assert not m.set_fused_training(False, save_memory=True).fused_training_save_memory  # off is off
    with pytest.raises(TypeError, match="save_memory must be a bool, got str"):
        m.set_fused_training(save_memory="yes")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton'\), got 'cuda'"):
        m.set_fused_training(True, backend="cuda")
    with pytest.raises(TypeError, match="enable must be a bool, got int"):
        m.set_fused_training(1)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(dla_fast.create_model("dla34"))
    with pytest.raises(TypeError, match="does not support SyncBatchNorm .* e.g. 'base_layer.1'"):
        sync.set_fused_training()
    assert sync.fused_training is None  # refused: nothing changed
    f = dla_fast.create_model("dla34", features_only=True, out_indices=(2, 3))
    assert f.set_fused_training() is f and f.fused_training == "auto"


def test_auto_on_the_cpu_runs_the_modules():
    """backend="auto" off CUDA: the modules themselves, so the very same numbers, running statistics included."""
    model = _model()
    fused, plain, _ = _three(model, "auto")
    x, t = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2,))
    (yf, gf), (yp, gp) = _step(fused, x, t), _step(plain, x, t)
    assert torch.equal(yf, yp) and all(torch.equal(a, b) for a, b in zip(gf, gp))
    assert all(torch.equal(a, b) for a, b in zip(_buffers(fused), _buffers(plain)))


def test_eval_and_traces_use_the_modules(monkeypatch):
    """eval(), torch.fx and torch.jit.script never reach the fused path: they run and record the modules."""
    model = _model("dla34").set_fused_training(True, backend="triton")

    def boom(*a, **k):
        raise AssertionError("the fused training path ran")
    monkeypatch.setattr(fused_model, "stage", boom)
    x = torch.randn(1, 3, 64, 64)
    ref = copy.deepcopy(model).set_fused_training(False)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref.eval()(x))
    model.train()
    gm = torch.fx.symbolic_trace(model)
    assert not any("stage" in str(n.target) for n in gm.graph.nodes)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.equal(scripted.eval()(x), ref(x))


def test_triton_backend_refuses_what_it_cannot_run():
    model = _model().set_fused_training(True, backend="triton")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run the fused training kernels"):
        model.double()(x)


# ------------------------------------------------------------------------------------------ the kernels (CPU)

@needs_interp
def test_fused_training_step_against_float64(monkeypatch):
    """One training step of a whole model on the kernels (float32, interpreter): output, every gradient and every
    running statistic within 2x the modules' error against float64; the parameters are the model's own; the
    trees' max pools ran on the kernels too; no activation gradients summed by autograd (each tensor's readers
    share it, their gradients added in the kernels of the backward: the modules' step forms such sums)."""
    from dla_fast.train import _autograd as ag
    model = _model("dla46_c")
    fused, eager, truth = _three(model, "triton")
    params = list(fused.parameters())
    x, t = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2,))
    pools = []
    apply = ag.MaxPool.apply
    monkeypatch.setattr(ag.MaxPool, "apply", lambda *a: pools.append(a[1]) or apply(*a))
    with AddCounter() as fused_adds:
        yf, gf = _step(fused, x, t)
    # every distinct downsampling: of dla46_c's 6 MaxPool2d, levels 3 and 4 each repeat their outer tree's in tree1
    assert sum(isinstance(m, nn.MaxPool2d) for m in fused.modules()) == 6 and pools == [2] * 4
    with AddCounter() as eager_adds:
        ye, ge = _step(eager, x, t)
    assert fused_adds.n == 0 and eager_adds.n > 0, (fused_adds.n, eager_adds.n)
    yt, gt = _step(truth, x.double(), t)
    assert all(p is q for p, q in zip(params, fused.parameters()))
    assert all(p.grad is not None for p in params)  # the optimizer's tensors got their gradients
    _compare("output", [yf], [ye], [yt], FLOOR[torch.float32])
    _compare("gradients", gf, ge, gt, FLOOR[torch.float32])
    _compare("buffers", _buffers(fused), _buffers(eager), _buffers(truth), FLOOR[torch.float32])


@pytest.mark.parametrize("name,modules", [("dla34", 6), ("dla102", 9), ("dla169", 11)])
def test_fused_training_pools_each_input_once(name, modules, monkeypatch):
    """Where the trees' pools run on the kernels, each input is pooled once (an outer tree hands its map down, and a
    tree that reads no map pools nothing); where the modules run, every tree pools, as they do. (The kernel is
    replaced by F.max_pool2d here: the count is the point; test_fused_training_step_against_float64 runs it.)"""
    from dla_fast.train import _autograd as ag
    from dla_fast.train import model as tm
    calls = []
    real_pool = tm._pool_kernel
    monkeypatch.setattr(ag.MaxPool, "apply", lambda x, k, share: (calls.append(k) or F.max_pool2d(x, k, k), x))
    m = dla_fast.create_model(name).train()
    x = torch.randn(2, 3, 64, 64)

    def run(kernel):
        monkeypatch.setattr(tm, "_pool_kernel",
                            (lambda pool, x, backend: 2 if isinstance(pool, nn.MaxPool2d) else None) if kernel
                            else real_pool)
        calls.clear()
        pools = []
        monkeypatch.setattr(nn.MaxPool2d, "forward", lambda self, t: pools.append(1) or F.max_pool2d(t, 2, 2))
        y = x
        for stage in ("base_layer", "level0", "level1", "level2", "level3", "level4", "level5"):
            y = tm.stage(getattr(m, stage), y, backend="eager")
        return len(calls), len(pools), y
    kernel_pools, module_pools, y = run(True)
    assert (kernel_pools, module_pools) == (4, 0)
    kernel_pools, module_pools, y2 = run(False)
    assert (kernel_pools, module_pools) == (0, modules) == (0, sum(isinstance(t, nn.MaxPool2d) for t in m.modules()))
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)


def _features_step(model, x):
    """A detector's backward through a features_only backbone: fixed random gradients on every returned level
    (the same for every run), each parameter's gradient and the levels back."""
    model.zero_grad(set_to_none=True)
    feats = model(x)
    grads = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i)).to(f.device, f.dtype)
             for i, f in enumerate(feats)]
    torch.autograd.backward(feats, grads)
    return [f.detach() for f in feats], [p.grad.detach().clone() for p in model.parameters()]


def _features_three(name, hw, device, amp=None):
    """(levels, gradients, buffers) of the fused, eager and float64 runs of a features_only model (levels 2-5,
    as CenterNet / FairMOT take them) at a non-square input."""
    model = _model(name, features_only=True, out_indices=(2, 3, 4, 5)).to(device, memory_format=torch.channels_last)
    fused, eager, truth = _three(model, "triton")
    x = torch.randn(2, 3, *hw, device=device).contiguous(memory_format=torch.channels_last)
    out = []
    for m, xin, a in ((fused, x, amp), (eager, x, amp), (truth, x.double(), None)):
        with torch.autocast(device.type, dtype=a, enabled=a is not None):
            feats, grads = _features_step(m, xin)
        out.append((feats, grads, _buffers(m)))
    return out


@needs_interp
def test_fused_training_of_a_detection_backbone():
    """features_only (levels 2-5) at a non-square input: every level a detector reads, every gradient (each
    level is read by the next stage and by the detector, two gradients summed) and every running statistic within
    2x the modules' error against float64."""
    (ff, gf, bf), (fe, ge, be), (ft, gt, bt) = _features_three("dla46_c", (64, 96), torch.device("cpu"))
    assert [tuple(f.shape[2:]) for f in ff] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    _compare("levels", ff, fe, ft, FLOOR[torch.float32])
    _compare("gradients", gf, ge, gt, FLOOR[torch.float32])
    _compare("buffers", bf, be, bt, FLOOR[torch.float32])


@needs_interp
def test_save_memory_keeps_one_tensor_a_layer_fewer(monkeypatch):
    """``set_fused_training(save_memory=True)``: inside the bottleneck blocks each inner activation is deferred to
    the next conv (its prologue, or with DLA_FAST_TRAIN_SAVE_MEMORY=recompute a pass of its own dropped after the
    conv), so the tensors kept for the backward shrink by exactly those activations' bytes; the step's numbers stay
    those of the default, which keeps them."""
    from dla_fast import _env
    from dla_fast.train.ops import Deferred
    model = _model("dla46_c", seed=2)
    x, t = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,))
    runs, call = {}, fused_model.conv_bn_act
    for mode in ("prologue", "recompute", "keep"):
        monkeypatch.setenv("DLA_FAST_TRAIN_SAVE_MEMORY", "prologue" if mode == "keep" else mode)
        _env.reload()
        fused = copy.deepcopy(model).set_fused_training(True, backend="triton", save_memory=mode != "keep")
        deferred, saved = [], {}

        def spy(*a, **kw):
            out = call(*a, **kw)
            d = out[0] if kw.get("share") else out  # (output, x shared) where a block's first conv shares x
            if isinstance(d, Deferred):
                deferred.append(d.z.numel() * d.z.element_size())
            return out

        def pack(tensor):
            if tensor.dim() == 4:  # activations and conv weights (the same weights in every run)
                saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        monkeypatch.setattr(fused_model, "conv_bn_act", spy)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            y, g = _step(fused, x, t)
        runs[mode] = (sum(deferred), sum(saved.values()), y, g, _buffers(fused))
    keep = runs["keep"]
    assert keep[0] == 0 and any(type(m).__name__ == "DlaBottleneck" for m in model.modules())
    for mode in ("prologue", "recompute"):
        on = runs[mode]
        assert on[0] > 0
        assert keep[1] - on[1] == on[0], f"{mode}: kept {keep[1]} bytes by default, {on[1]}; deferred {on[0]}"
        torch.testing.assert_close(on[2], keep[2], rtol=1e-5, atol=1e-6)
        for a, b in zip(on[3] + on[4], keep[3] + keep[4]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("DLA_FAST_TRAIN_SAVE_MEMORY", "later")
    _env.reload()
    try:
        with pytest.raises(ValueError, match="DLA_FAST_TRAIN_SAVE_MEMORY='later' is not a mode"):
            _step(copy.deepcopy(model).set_fused_training(True, backend="triton", save_memory=True), x, t)
    finally:
        monkeypatch.delenv("DLA_FAST_TRAIN_SAVE_MEMORY")
        _env.reload()  # the next test reads the switch afresh


@needs_interp
def test_fused_training_with_checkpointing():
    """Checkpointed fused training recomputes the same kernels: the same gradients, statistics updated once."""
    model = _model("dla46_c", seed=1)
    a = copy.deepcopy(model).set_fused_training(True, backend="triton")
    b = copy.deepcopy(model).set_fused_training(True, backend="triton")
    b.set_grad_checkpointing(True)
    x, t = torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,))
    (ya, ga), (yb, gb) = _step(a, x, t), _step(b, x, t)
    assert torch.equal(ya, yb)
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for p, q in zip(ga, gb))
    assert all(torch.equal(p, q) for p, q in zip(_buffers(a), _buffers(b)))


# ------------------------------------------------------------------------------------------ the GPU

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", dla_fast.list_models())
@pytest.mark.parametrize("save_memory", [False, True], ids=["keep", "save_memory"])
def test_fused_training_all_variants_cuda(name, amp, save_memory):
    """Every variant, one step under autocast on the kernels (backend="triton": nothing falls back silently), with
    the blocks' inner activations kept and not kept (``save_memory``): output, gradients and running statistics
    within 2x eager autocast's error against float64."""
    _check_step_cuda(name, amp, save_memory)


def _check_step_cuda(name, amp, save_memory=False):
    """One step of ``name`` at batch 8, 64x64, on the kernels under autocast to ``amp``: output, gradients and
    running statistics within 2x eager autocast's error against float64."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = _model(name).cuda().to(memory_format=torch.channels_last)
    fused, eager, truth = _three(model, "triton")
    fused.set_fused_training(True, backend="triton", save_memory=save_memory)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (8,), device="cuda")
    yf, gf = _step(fused, x, t, amp)
    ye, ge = _step(eager, x, t, amp)
    yt, gt = _step(truth, x.double(), t)
    _compare("output", [yf], [ye], [yt], FLOOR[amp])
    _compare("gradients", gf, ge, gt, FLOOR[amp])
    _compare("buffers", _buffers(fused), _buffers(eager), _buffers(truth), FLOOR[amp])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
def test_fused_training_of_a_detection_backbone_cuda(amp):
    """DLA-34 as CenterNet trains it, features_only (levels 2-5), at 384x640 under autocast on the kernels:
    levels, gradients and running statistics within 2x eager autocast's error against float64."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    (ff, gf, bf), (fe, ge, be), (ft, gt, bt) = _features_three("dla34", (384, 640), torch.device("cuda"), amp)
    assert [tuple(f.shape[2:]) for f in ff] == [(96, 160), (48, 80), (24, 40), (12, 20)]
    _compare("levels", ff, fe, ft, FLOOR[amp])
    _compare("gradients", gf, ge, gt, FLOOR[amp])
    _compare("buffers", bf, be, bt, FLOOR[amp])


def _step_cuda_with(name, amp, monkeypatch, var: str, value: str, attr: str, module=None):
    """:func:`_check_step_cuda` with the switch ``var`` set to ``value``; returns (args, result) of every call of
    ``<module>.<attr>`` in the step (module: ``dla_fast.backends.triton._train`` unless given)."""
    from dla_fast import _env
    from dla_fast.backends.triton import _train as kt

    module = kt if module is None else module
    monkeypatch.setenv(var, value)
    _env.reload()
    calls = []
    real = getattr(module, attr)

    def counted(*a, **kw):
        r = real(*a, **kw)
        calls.append((a, r))
        return r
    monkeypatch.setattr(module, attr, counted)
    try:
        _check_step_cuda(name, amp)
    finally:
        monkeypatch.undo()
        _env.reload()
    return calls


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["dla34", "dla102"])
def test_transposed_statistics_whole_step_cuda(name, amp, monkeypatch):
    """DLA_FAST_TRAIN_STATS_TILE=channels (the default): the statistics convs and aggregation nodes with wide tiles
    run transposed (seen chosen), the step still within 2x eager autocast's error against float64 everywhere."""
    calls = _step_cuda_with(name, amp, monkeypatch, "DLA_FAST_TRAIN_STATS_TILE", "channels", "stats_swap")
    assert any(r for _, r in calls), "no statistics conv took the transposed tile"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["dla34", "dla60x_c"])
def test_statistics_pass_whole_step_cuda(name, amp, monkeypatch):
    """DLA_FAST_TRAIN_STATS_PASS=all: every conv of the step on the CUDA extension's conv with a statistics pass
    (the gate seen taking more than the stem), the step still within 2x eager autocast's error against float64
    everywhere."""
    from dla_fast.train import _autograd as ag

    calls = _step_cuda_with(name, amp, monkeypatch, "DLA_FAST_TRAIN_STATS_PASS", "all", "conv_on_cuda", ag)
    taken = [tuple(a[1].shape) for a, r in calls if r]
    assert len(taken) > 1 and any(s[1] > 3 for s in taken), taken


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["dla34", "dla60x_c"])
def test_thin_wgrad_whole_step_cuda(name, amp, monkeypatch):
    """DLA_FAST_TRAIN_WGRAD=triton (the GPU's default, set here): the front's weight gradients on the thin-conv
    kernel (its three convs seen launched), the step still within 2x eager autocast's error against float64
    everywhere."""
    calls = _step_cuda_with(name, amp, monkeypatch, "DLA_FAST_TRAIN_WGRAD", "triton", "wgrad_thin_launch")
    launched = [tuple(a[2].shape) for a, _ in calls]
    assert launched == [(32, 16, 3, 3), (16, 16, 3, 3), (16, 3, 7, 7)], launched  # backward order: level 1 first


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["dla34", "dla60x_c"])
def test_thin_dgrad_whole_step_cuda(name, amp, monkeypatch):
    """DLA_FAST_TRAIN_DGRAD=triton (the GPU's default, set here): level 0's data gradient on the Triton conv
    kernel (the gate seen taking the 16-channel stride-1 3x3 and nothing else), the step still within 2x eager
    autocast's error against float64 everywhere."""
    from dla_fast.train import _autograd as ag

    calls = _step_cuda_with(name, amp, monkeypatch, "DLA_FAST_TRAIN_DGRAD", "triton", "thin_dgrad", ag)
    taken = [tuple(a[1].shape) for a, r in calls if r]
    assert taken == [(16, 16, 3, 3)], taken


@pytest.mark.cuda
@needs_cuda
def test_fused_training_under_compile_and_checkpointing_cuda():
    """torch.compile around a fused model: within the float64 criterion, as the fused model is (the compiled graph
    rounds the bf16 glue between the kernels differently, so neither is the other's reference); checkpointing
    recomputes the same kernels: the fused model's own step."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = _model("dla34").cuda()
    a, eager, truth = _three(model, "auto")
    b = copy.deepcopy(model).set_fused_training(True)
    c = copy.deepcopy(model).set_fused_training(True)
    c.set_grad_checkpointing(True)
    x, t = torch.randn(8, 3, 64, 64, device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
    ya, ga = _step(a, x, t, torch.bfloat16)
    ye, ge = _step(eager, x, t, torch.bfloat16)
    yt, gt = _step(truth, x.double(), t)
    torch._dynamo.reset()
    yb, gb = _step(torch.compile(b), x, t, torch.bfloat16)
    yc, gc = _step(c, x, t, torch.bfloat16)
    _compare("compiled output", [yb], [ye], [yt], FLOOR[torch.bfloat16])
    _compare("compiled gradients", gb, ge, gt, FLOOR[torch.bfloat16])
    _compare("compiled buffers", _buffers(b), _buffers(eager), _buffers(truth), FLOOR[torch.bfloat16])
    assert torch.equal(yc, ya) and max(rel_err(p, q) for p, q in zip(gc, ga)) < 1e-5


@pytest.mark.cuda
@needs_cuda
def test_fused_training_follows_eager_loss_curve_cuda():
    """300 SGD steps (lr 0.05, momentum 0.9, weight decay 1e-4) of dla34 on a fixed synthetic task (512 images of
    64x64, 10 classes drawn by a fixed random linear teacher, batches of 32 in a fixed order) under bf16 autocast.

    Two bf16 runs of a chaotic optimisation drift apart step by step whatever their kernels, so the curves are
    compared as means over windows of 20 steps, and the fused run's largest distance from eager bf16 is held to
    what rounding alone does: at most twice eager bf16's largest distance from the same training in float32 (the
    criterion of every numerics test here, applied to the curve), plus 0.02 for the windows' own noise."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(512, 3, 64, 64, generator=gen)
    teacher = torch.randn(3 * 64 * 64, 10, generator=gen)
    labels = (images.flatten(1) @ teacher).argmax(1)
    images, labels = images.cuda(), labels.cuda()
    order = torch.randint(0, 512, (300, 32), generator=gen).cuda()
    init = _model("dla34", num_classes=10).cuda()

    def curve(fused, amp):
        m = copy.deepcopy(init).set_fused_training(fused, backend="triton") if fused else copy.deepcopy(init)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        losses = []
        for idx in order:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                out = m(images[idx])
            loss = F.cross_entropy(out.float(), labels[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses).view(-1, 20).mean(1)

    fused, eager, fp32 = curve(True, torch.bfloat16), curve(False, torch.bfloat16), curve(False, None)
    assert torch.isfinite(fused).all() and fused[-1] < 0.5 * fused[0]  # it learns
    assert (fused - eager).abs().max() <= RATIO * (eager - fp32).abs().max() + 0.02, (fused, eager, fp32)
