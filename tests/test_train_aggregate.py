"""Tests of the training aggregation node: relu(bn_train(conv1x1(cat(children))) + children[0]), concat-free,
forward and backward (dla_fast.train.aggregate_bn_relu_train, TrainAggregate, the agg_stats kernel).

Judged as tests/test_train_ops.py judges the conv layer: every quantity (output, each child's gradient, the
weight's, gamma's and beta's, the running statistics) against a float64 eager reference on the same rounded
inputs, each run through its own ReLU mask, passing at <= 2x eager's error plus verify.FLOOR. Kernel outputs
start as NaN (the poison fixture imported from test_train_ops).
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn

from dla_fast.train import TrainAggregate, aggregate_bn_relu_train, aggregate_bn_relu_train_ref
from dla_fast.train import _autograd as ag
from dla_fast.train import ops as train_ops
from test_train_ops import (DEV, DT_ID, HAS_CUDA, SMALL_DTYPES, AddCounter, _judge, _judge2, _layout,  # noqa: F401
                            _leaf, _poison_and_ieee, _rel, _run_py, needs_cuda, needs_kernels, needs_triton)


class AggCase:
    """One aggregation node's inputs, drawn once in fp32: children of ``chans`` channels (N, C_i, H, W) -> Cout."""

    def __init__(self, N, chans, Cout, H, W, *, shortcut=False, relu=True, seed=0, device=None):
        device = device or DEV
        g = torch.Generator().manual_seed(seed)
        self.conf = dict(shortcut=shortcut, relu=relu)
        self.kids = [torch.randn(N, c, H, W, generator=g).to(device) for c in chans]
        ctot = sum(chans)
        self.w = (torch.randn(Cout, ctot, 1, 1, generator=g) * ctot ** -0.5).to(device)
        self.gamma = (torch.rand(Cout, generator=g) + 0.5).to(device)
        self.beta = (torch.randn(Cout, generator=g) * 0.5).to(device)
        self.rm = (torch.randn(Cout, generator=g) * 0.2).to(device)
        self.rv = (torch.rand(Cout, generator=g) + 0.5).to(device)
        self.gy = torch.randn(N, Cout, H, W, generator=g).to(device)

    def run(self, backend, dtype, *, momentum=0.1, nbt=3, layouts=None, autocast=False, operands=None, mask=None,
            gy_dtype=None, gy_layout="nchw"):
        """Forward + backward; {name: tensor} of everything the node produces (see test_train_ops.Case.run)."""
        pd = torch.float64 if dtype == torch.float64 else torch.float32
        low = (lambda t: t.to(operands).to(dtype)) if operands is not None else (lambda t: t.to(dtype))
        layouts = layouts or ["nchw"] * len(self.kids)
        in_dt = torch.float32 if autocast else dtype
        kids = [_leaf(_layout(k.clone() if autocast else low(k).to(in_dt), lay)) for k, lay in zip(self.kids, layouts)]
        w = _leaf(self.w if autocast else low(self.w).to(in_dt))
        gamma, beta = _leaf(self.gamma.to(pd)), _leaf(self.beta.to(pd))
        rm, rv = self.rm.to(pd).clone(), self.rv.to(pd).clone()
        n = torch.tensor(nbt, device=w.device)
        conf = dict(self.conf)
        if mask is not None:
            conf["relu"] = False
        with torch.autocast(w.device.type, dtype=dtype, enabled=autocast):
            y = aggregate_bn_relu_train(kids, w, gamma, beta, rm, rv, n, momentum=momentum, backend=backend, **conf)
        if mask is not None:
            y = torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device))
        gy = self.gy.to(gy_dtype) if gy_dtype is not None else self.gy
        y.backward(_layout(gy.to(y.dtype), gy_layout))
        out = dict(y=y.detach(), dw=w.grad, dgamma=gamma.grad, dbeta=beta.grad, running_mean=rm, running_var=rv,
                   nbt=n)
        out.update({f"dchild{i}": k.grad for i, k in enumerate(kids)})
        return out


def _compare(case: AggCase, dtype, what, backend="triton", **kw):
    """The fused node and eager PyTorch in ``dtype``, each against float64 through its own ReLU mask (why: see
    test_train_ops._compare)."""
    ours = case.run(backend, dtype, **kw)
    eager = case.run("eager", dtype, **kw)
    kw64 = {k: v for k, v in kw.items() if k != "autocast"}
    kw64.update(operands=dtype, gy_dtype=ours["y"].dtype)
    relu = case.conf["relu"]
    ref_ours = case.run("eager", torch.float64, mask=ours["y"] > 0 if relu else None, **kw64)
    ref_eager = case.run("eager", torch.float64, mask=eager["y"] > 0 if relu else None, **kw64) if relu else ref_ours
    assert ours["y"].dtype == eager["y"].dtype, f"{what}: output dtype {ours['y'].dtype} != {eager['y'].dtype}"
    assert ours["y"].is_contiguous(memory_format=torch.channels_last), f"{what}: output not channels_last"
    assert set(ours) == set(ref_ours) == set(eager)
    for k in ours:
        if k == "nbt":
            assert ours[k].item() == ref_ours[k].item() == kw.get("nbt", 3) + 1, f"{what}: num_batches_tracked"
            continue
        assert ours[k] is not None, f"{what}: no {k}"
        assert ours[k].dtype == eager[k].dtype, f"{what} {k}: dtype {ours[k].dtype} != eager's {eager[k].dtype}"
        _judge2(f"{what} {k}", ours[k], ref_ours[k], eager[k], ref_eager[k], dtype)
    return ours


# --------------------------------------------------------------------------- small shapes (interpreter)

# name: (N, children's channels, Cout, H, W, shortcut, relu)
SMALL = {
    "2kids_short": (2, (8, 8), 8, 5, 7, True, True),
    "3kids_8_8_16": (2, (8, 8, 16), 12, 7, 5, False, True),
    "3kids_short": (2, (16, 8, 8), 16, 6, 6, True, True),
    "4kids_odd": (2, (8, 5, 16, 3), 20, 9, 9, False, True),
    "batch1_short": (1, (8, 8, 16), 8, 9, 8, True, True),
    "norelu": (2, (8, 16), 12, 5, 5, False, False),
}


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
@pytest.mark.parametrize("name", list(SMALL))
def test_forward_backward_small(name, dtype):
    """Output, each child's gradient, dW, dgamma, dbeta, running statistics and the counter."""
    N, chans, Cout, H, W, short, relu = SMALL[name]
    case = AggCase(N, chans, Cout, H, W, shortcut=short, relu=relu, seed=zlib.crc32(name.encode()))
    _compare(case, dtype, name)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("layouts,gy_layout", [
    (("cl", "cl", "cl"), "cl"), (("slice", "nchw", "strided"), "strided"), (("strided", "slice", "cl"), "nchw"),
])
def test_layouts(layouts, gy_layout):
    """Channels_last, NCHW, channel-slice and fully strided children (the residual child included) and output
    gradients give the same numbers."""
    case = AggCase(2, (8, 8, 16), 8, 7, 6, shortcut=True, seed=31)
    _compare(case, torch.float32, f"layouts {layouts}/{gy_layout}", layouts=list(layouts), gy_layout=gy_layout)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_weight_gradient_keeps_the_weight_layout(cl):
    """dW comes back with the weight's own strides (a channels_last 1x1 weight, as ``model.to(memory_format=
    torch.channels_last)`` makes it: the same bytes as a contiguous one, strides (Cin, 1, Cin, Cin)), the layout
    autograd and DDP's gradient buckets expect of a parameter's gradient."""
    kids = [torch.randn(2, c, 5, 5, device=DEV).contiguous(memory_format=torch.channels_last) for c in (8, 16)]
    w = torch.randn(8, 1, 1, 24, device=DEV).permute(0, 3, 1, 2) if cl else torch.randn(8, 24, 1, 1, device=DEV)
    w = (w * 0.2).requires_grad_()
    assert w.stride() == ((24, 1, 24, 24) if cl else (24, 1, 1, 1))
    z, _, _ = ag.AggStats.apply("triton", None, False, w, *kids)
    gz = torch.randn_like(z)
    (dw,) = torch.autograd.grad(z, (w,), gz)
    zr, _, _ = ag.AggStats.apply("torch", None, False, w, *kids)
    (dw_r,) = torch.autograd.grad(zr, (w,), gz)
    assert dw.stride() == w.stride() and _rel(dw, dw_r) < 1e-5


@pytest.mark.interpreter
@needs_kernels
def test_children_read_in_place():
    """Channel slices of one channels_last tensor (how a tree's outputs can sit in one buffer) are read where
    they are: AggStats saves the very tensors, no copies, and the gradients land on each slice."""
    big = torch.randn(2, 24, 5, 5, device=DEV).contiguous(memory_format=torch.channels_last).requires_grad_()
    kids = [big[:, :8], big[:, 8:24]]
    w = (torch.randn(8, 24, 1, 1, device=DEV) * 0.2).requires_grad_()
    z, mean, var = ag.AggStats.apply("triton", None, False, w, *kids)
    assert z.grad_fn is not None
    saved = z.grad_fn.saved_tensors
    assert saved[1].data_ptr() == big.data_ptr() and saved[2].data_ptr() == kids[1].data_ptr()
    zr, mr, vr = ag.AggStats.apply("torch", None, False, w, *kids)
    assert _rel(z, zr) < 1e-5 and _rel(mean, mr) < 1e-5 and _rel(var, vr) < 1e-5
    gz = torch.randn_like(z)
    dbig, dw = torch.autograd.grad(z, (big, w), gz)
    dbig_r, dw_r = torch.autograd.grad(zr, (big, w), gz)
    assert _rel(dbig, dbig_r) < 1e-5 and _rel(dw, dw_r) < 1e-5


@pytest.mark.interpreter
@needs_kernels
def test_agg_stats_kernel_many_children():
    """The kernel alone, every child count it takes (1 to 8), unequal channel counts across K-chunk edges,
    against the concat conv in float64, with the pixel-major tile and its transpose."""
    from dla_fast.backends.triton import _train as kt
    from dla_fast.backends.triton._launch import aggregate_plan, interpreted
    gen = torch.Generator().manual_seed(5)
    for nc in range(1, kt.MAX_CHILDREN + 1):
        chans = [3 + 5 * i for i in range(nc)]
        kids = [torch.randn(2, c, 4, 5, generator=gen).to(DEV) for c in chans]
        w = torch.randn(10, sum(chans), 1, 1, generator=gen).to(DEV)
        z64 = torch.nn.functional.conv2d(torch.cat(kids, 1).double(), w.double())
        cfg = aggregate_plan(2 * 4 * 5, chans, 10, torch.float32, interpreted(), False, 0)
        for swap in (False, True):  # the pixel-major tile and its transpose (channels as the MMA's rows)
            z, mean, var = kt.agg_stats_launch(kids, w, config=dict(cfg, SWAP=swap))
            assert _rel(z, z64) < 1e-5, (nc, swap)
            assert _rel(mean, z64.mean((0, 2, 3))) < 1e-5, (nc, swap)
            assert _rel(var, z64.var((0, 2, 3), unbiased=False)) < 1e-5, (nc, swap)
    assert kt.MAX_CHILDREN == train_ops.AGG_MAX_CHILDREN
    with pytest.raises(ValueError, match="1 to 8 children"):
        kt.agg_stats_launch([kids[0]] * 9, torch.randn(10, 9 * 3, 1, 1))
    with pytest.raises(ValueError, match="the weight takes"):
        kt.agg_stats_launch(kids[:2], torch.randn(10, 5, 1, 1))


@pytest.mark.interpreter
@needs_kernels
def test_64bit_offsets(monkeypatch):
    """The IDX64 variant of the aggregation kernel (used when a tensor spans >= 2^31 elements)."""
    from dla_fast.backends.triton import _train as kt
    monkeypatch.setattr(kt, "_IDX64_THRESHOLD", 0)
    _compare(AggCase(2, (8, 5, 16), 8, 5, 7, shortcut=True, seed=32), torch.float32, "idx64",
             layouts=["cl", "slice", "nchw"])


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=DT_ID)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
def test_running_stats_over_steps(momentum, dtype):
    """Running mean/var and the counter after 1 and 3 steps on different batches, from a fresh BN."""
    cases = [AggCase(2, (8, 8, 16), 12, 5, 5, seed=60 + i) for i in range(3)]
    state = {}
    for backend, dt in (("triton", dtype), ("eager", dtype), ("eager", torch.float64)):
        pd = torch.float64 if dt == torch.float64 else torch.float32
        rm, rv = cases[0].rm.to(pd).clone(), cases[0].rv.to(pd).clone()
        n = torch.tensor(0, device=rm.device)
        snaps = []
        for c in cases:
            aggregate_bn_relu_train([k.to(dt) for k in c.kids], c.w.to(dt), c.gamma.to(pd), c.beta.to(pd), rm, rv,
                                    n, momentum=momentum, backend=backend)
            snaps.append((rm.clone(), rv.clone(), n.item()))
        state[(backend, dt)] = snaps
    for step in (0, 2):
        ours, eager, ref = (state[k][step] for k in (("triton", dtype), ("eager", dtype), ("eager", torch.float64)))
        assert ours[2] == eager[2] == ref[2] == step + 1
        _judge(f"running_mean after {step + 1}", ours[0], eager[0], ref[0], dtype)
        _judge(f"running_var after {step + 1}", ours[1], eager[1], ref[1], dtype)


@pytest.mark.interpreter
@needs_kernels
def test_autocast_fp16():
    """Under autocast: fp32 children and parameters, the conv in fp16, the shortcut child (fp32) promoting the
    output to fp32 as eagerly, gradients reaching every fp32 child and the weight in fp32."""
    case = AggCase(2, (8, 8, 16), 8, 5, 6, shortcut=True, seed=70)
    out = _compare(case, torch.float16, "autocast", autocast=True, layouts=["cl", "nchw", "slice"])
    assert out["y"].dtype == torch.float32 and out["dw"].dtype == torch.float32
    assert all(out[f"dchild{i}"].dtype == torch.float32 for i in range(3))


@pytest.mark.interpreter
@needs_kernels
def test_shortcut_gradient_joins_in_the_childs_kernel():
    """With the shortcut, the first child's gradient (through the conv and through the shortcut) comes out of
    one kernel, the shortcut's part added in its epilogue: no add of child-sized tensors in the backward."""
    case = AggCase(2, (8, 8, 16), 8, 5, 6, shortcut=True, seed=73)
    kids = [_leaf(k) for k in case.kids]
    y = aggregate_bn_relu_train(kids, _leaf(case.w), _leaf(case.gamma), _leaf(case.beta), shortcut=True,
                                backend="triton")
    with AddCounter(kids[0].shape) as adds:
        y.backward(case.gy)
    assert adds.n == 0
    kids_r = [_leaf(k) for k in case.kids]
    y_r = aggregate_bn_relu_train_ref(kids_r, _leaf(case.w), _leaf(case.gamma), _leaf(case.beta), None, None, None,
                                      0.1, 1e-5, True, True)
    y_r.backward(case.gy)
    assert _rel(kids[0].grad, kids_r[0].grad) < 1e-4


@pytest.mark.interpreter
@needs_kernels
def test_only_some_gradients():
    """Children that need no gradient get none, and the others' are unchanged."""
    case = AggCase(2, (8, 8, 16), 8, 5, 5, shortcut=True, seed=71)
    w = _leaf(case.w)
    kids = [case.kids[0], _leaf(case.kids[1]), case.kids[2]]
    y = aggregate_bn_relu_train(kids, w, case.gamma, case.beta, shortcut=True, backend="triton")
    y.backward(case.gy)
    kids_r = [case.kids[0], _leaf(case.kids[1]), case.kids[2]]
    w_r = _leaf(case.w)
    y_r = aggregate_bn_relu_train_ref(kids_r, w_r, case.gamma, case.beta, None, None, None, 0.1, 1e-5, True, True)
    y_r.backward(case.gy)
    assert kids[0].grad is None and kids[2].grad is None
    assert _rel(kids[1].grad, kids_r[1].grad) < 1e-4 and _rel(w.grad, w_r.grad) < 1e-4


def test_gradcheck_float64():
    """The hand-written backward (torch pieces, float64) against finite differences: every child (the
    shortcut child through both of its paths), the weight, gamma and beta."""
    gen = torch.Generator().manual_seed(72)
    kids = [torch.randn(2, c, 3, 3, generator=gen, dtype=torch.float64).requires_grad_() for c in (4, 3, 5)]
    w = (torch.randn(4, 12, 1, 1, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
    gamma = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()

    def f(k0, k1, k2, w, gamma, beta):
        z, mean, var = ag.AggStats.apply("torch", None, False, w, k0, k1, k2)
        return ag.BnAct.apply(z, mean, var, gamma, beta, k0, 1e-5, False, torch.float64, "torch")

    assert torch.autograd.gradcheck(f, (*kids, w, gamma, beta))

    def shared(k0, k1, k2, w, gamma, beta):  # the shortcut reads the first child through the node's own output
        z, mean, var, k0s = ag.AggStats.apply("torch", None, True, w, k0, k1, k2)
        return ag.BnAct.apply(z, mean, var, gamma, beta, k0s, 1e-5, False, torch.float64, "torch")

    assert torch.autograd.gradcheck(shared, (*kids, w, gamma, beta))


# ------------------------------------------------------------------------------------------------ modules

def _root(chans=(8, 8, 16), cout=8, shortcut=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(sum(chans), cout, 1, bias=False)
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    root = nn.Module()
    root.conv, root.bn, root.shortcut = conv, bn, shortcut
    return root


def _timm_root_forward(root, kids):
    """timm's DlaRoot.forward, written out (conv over the concat, bn, += children[0], relu)."""
    y = root.bn(root.conv(torch.cat(kids, 1)))
    if root.shortcut:
        y = y + kids[0]
    return torch.relu(y)


def test_module_shares_parameters_and_state_dict():
    root = _root()
    m = TrainAggregate.from_root(root)
    assert m.conv is root.conv and m.bn is root.bn and m.shortcut
    sd = m.state_dict()
    assert set(sd) == {f"conv.{k}" for k in root.conv.state_dict()} | {f"bn.{k}" for k in root.bn.state_dict()}
    assert sd["bn.running_var"].data_ptr() == root.bn.running_var.data_ptr()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m([torch.randn(2, c, 4, 4) for c in (8, 8, 16)]).sum().backward()
    before = root.conv.weight.detach().clone()
    opt.step()
    assert not torch.equal(root.conv.weight, before)


def test_module_from_timm_root():
    timm_dla = pytest.importorskip("timm.models.dla")
    root = timm_dla.DlaRoot(32, 8, 1, True)
    m = TrainAggregate.from_root(root)
    assert m.conv is root.conv and m.shortcut is True
    kids = [torch.randn(2, c, 4, 4) for c in (8, 8, 16)]
    root.eval()
    m.eval()
    assert torch.equal(m(kids), root(kids))


def test_module_fallback_on_plain_cpu_is_the_eager_modules():
    """backend='auto' keeps the CPU on the eager modules: bit-identical to DlaRoot's forward, training and eval."""
    root, root2 = _root(seed=1), _root(seed=1)
    m = TrainAggregate.from_root(root)
    kids = [torch.randn(2, c, 5, 5) for c in (8, 8, 16)]
    assert "CUDA" in m.fallback_reason(kids)
    for train in (True, False):
        m.train(train)
        root2.train(train)
        y = m(kids)
        y2 = _timm_root_forward(root2, kids)
        assert torch.equal(y, y2)
        y.sum().backward()
        y2.sum().backward()
        assert torch.equal(root.conv.weight.grad, root2.conv.weight.grad)
        assert torch.equal(root.bn.weight.grad, root2.bn.weight.grad)
        assert torch.equal(root.bn.running_mean, root2.bn.running_mean)
        assert root.bn.num_batches_tracked.item() == root2.bn.num_batches_tracked.item() == 1


@pytest.mark.interpreter
@needs_kernels
def test_module_fused_training_steps():
    """Two fp32 training steps of the fused module (from a DlaRoot-like pair) against DlaRoot's eager forward
    and float64: output, the children's and parameters' gradients, running statistics; then eval() is the
    eager node. (fp16 is covered by the functional tests: a half module is the same call.)"""
    def run(backend, dt):
        root = _root(seed=2)
        root.to(DEV).to(dt)
        m = TrainAggregate.from_root(root, backend=backend) if backend else None
        outs = []
        for step in range(2):
            gen = torch.Generator().manual_seed(80 + step)
            kids = [torch.randn(2, c, 5, 6, generator=gen).to(DEV).to(dt).requires_grad_() for c in (8, 8, 16)]
            y = m(kids) if m is not None else _timm_root_forward(root, kids)
            y.backward(torch.randn(y.shape, generator=gen).to(DEV).to(dt))
            outs.append(dict(y=y.detach(), **{f"dchild{i}": k.grad for i, k in enumerate(kids)},
                             dw=root.conv.weight.grad.clone(), dgamma=root.bn.weight.grad.clone(),
                             dbeta=root.bn.bias.grad.clone(), running_mean=root.bn.running_mean.clone(),
                             running_var=root.bn.running_var.clone()))
        if m is not None:
            m.eval()
            root.eval()
            kids = [k.detach() for k in kids]
            assert torch.equal(m(kids), _timm_root_forward(root, kids))
            assert root.bn.num_batches_tracked.item() == 2
        return outs

    ours, eager, ref = run("triton", torch.float32), run(None, torch.float32), run(None, torch.float64)
    for step in range(2):
        for k in ours[step]:
            _judge(f"module step {step} {k}", ours[step][k], eager[step][k], ref[step][k], torch.float32)


def test_module_construction_errors():
    root = _root()
    with pytest.raises(TypeError, match="SyncBatchNorm"):
        TrainAggregate(root.conv, nn.SyncBatchNorm(8))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        TrainAggregate(nn.Linear(2, 2), root.bn)
    with pytest.raises(ValueError, match="bn has 4 features"):
        TrainAggregate(root.conv, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="groups=2"):
        TrainAggregate(nn.Conv2d(32, 8, 1, groups=2, bias=False), root.bn)
    with pytest.raises(TypeError, match="shortcut must be a bool"):
        TrainAggregate(root.conv, root.bn, shortcut=1)
    with pytest.raises(ValueError, match="too few channels"):
        TrainAggregate(nn.Conv2d(4, 8, 1, bias=False), root.bn, shortcut=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        TrainAggregate(root.conv, root.bn, backend="cuda")
    with pytest.raises(TypeError, match="DlaRoot-like"):
        TrainAggregate.from_root(nn.Identity())
    with pytest.raises(TypeError, match="non-empty list"):
        TrainAggregate(root.conv, root.bn)(torch.randn(2, 32, 4, 4))


@pytest.mark.interpreter
@needs_kernels
def test_module_falls_back_on_unsupported_nodes():
    """'auto' runs a padded / biased root conv and more children than the kernel reads eagerly, with the eager
    numbers; 'triton' refuses them saying why."""
    kids = [torch.randn(2, 4, 5, 5, device=DEV) for _ in range(9)]
    conv, bn = nn.Conv2d(36, 4, 1, bias=False).to(DEV), nn.BatchNorm2d(4).to(DEV)
    m = TrainAggregate(conv, bn, backend="triton")
    with pytest.raises(RuntimeError, match="at most 8 children"):
        m(kids)
    padded = TrainAggregate(nn.Conv2d(8, 4, 1, padding=1, bias=False).to(DEV), nn.BatchNorm2d(4).to(DEV),
                            backend="triton")
    with pytest.raises(RuntimeError, match="unpadded stride-1 1x1"):
        padded(kids[:2])
    biased = TrainAggregate(nn.Conv2d(8, 4, 1, bias=True).to(DEV), nn.BatchNorm2d(4).to(DEV), backend="triton")
    with pytest.raises(RuntimeError, match="has a bias"):
        biased(kids[:2])
    with pytest.raises(RuntimeError, match="at most 8 children"):
        aggregate_bn_relu_train(kids, conv.weight, bn.weight, bn.bias, backend="triton")
    # The child count is judged before the device: 'auto' on a GPU falls back for the same reason.
    assert "at most 8 children" in train_ops.aggregate_unavailable_reason(kids, conv.weight, "auto")


# ------------------------------------------------------------------------------------------- validation

def _args(**over):
    kids = [torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5), torch.randn(2, 16, 5, 5)]
    a = dict(children=kids, weight=torch.randn(8, 32, 1, 1), bn_weight=torch.ones(8), bn_bias=torch.zeros(8),
             running_mean=torch.zeros(8), running_var=torch.ones(8), num_batches_tracked=torch.tensor(0))
    kw = dict(shortcut=True, backend="eager")
    for k, v in over.items():
        (a if k in a else kw)[k] = v
    return a, kw


@pytest.mark.parametrize("over,exc,msg", [
    (dict(), None, None),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(children=torch.randn(2, 8, 5, 5)), TypeError, "children must be a list or tuple"),
    (dict(children=[]), ValueError, "children is empty"),
    (dict(children=[torch.randn(2, 8, 5), torch.randn(2, 24, 5, 5)]), ValueError, r"children\[0\] must be a 4-D"),
    (dict(children=[torch.randn(2, 8, 5, 5), torch.ones(2, 24, 5, 5, dtype=torch.long)]), TypeError,
     r"children\[1\] must be a floating-point"),
    (dict(children=[torch.randn(2, 8, 5, 5), torch.randn(2, 24, 5, 4)]), ValueError, "agree in batch and spatial"),
    (dict(children=[torch.randn(2, 8, 5, 5), torch.randn(2, 24, 5, 5).half()]), ValueError,
     "cast them to one dtype"),
    (dict(weight=torch.randn(8, 32, 3, 3)), ValueError, "not a 1x1 kernel"),
    (dict(weight=torch.randn(8, 30, 1, 1)), ValueError, r"must have shape \(Cout > 0, 32, 1, 1\)"),
    (dict(weight=torch.randn(8, 32, 1, 1).half()), ValueError, "cast them to one dtype"),
    (dict(weight=torch.randn(8, 32)), ValueError, "weight must be a 4-D"),
    (dict(weight=torch.randn(12, 32, 1, 1), bn_weight=torch.ones(12), bn_bias=torch.zeros(12),
          running_mean=torch.zeros(12), running_var=torch.ones(12)), ValueError, "shortcut adds children"),
    (dict(bn_weight=torch.ones(7)), ValueError, "bn_weight must have shape"),
    (dict(running_var=None), ValueError, "both be tensors or both be None"),
    (dict(num_batches_tracked=torch.zeros(2)), TypeError, "num_batches_tracked"),
    (dict(momentum=-0.1), ValueError, "momentum must be a number in"),
    (dict(eps=-1.0), ValueError, "eps must be a positive number"),
    (dict(shortcut=None), TypeError, "shortcut must be a bool"),
    (dict(relu="yes"), TypeError, "relu must be a bool"),
    (dict(children=[torch.randn(1, 8, 1, 1), torch.randn(1, 24, 1, 1)]), ValueError,
     "more than 1 value per channel"),
], ids=lambda v: str(v)[:40] if not isinstance(v, dict) else None)
def test_validation(over, exc, msg):
    a, kw = _args(**over)
    if exc is None:  # the valid call, as a control
        aggregate_bn_relu_train(*a.values(), **kw)
        return
    with pytest.raises(exc, match=msg):
        aggregate_bn_relu_train(*a.values(), **kw)


def test_validation_devices():
    a, kw = _args(weight=torch.randn(8, 32, 1, 1, device="meta"))
    with pytest.raises(ValueError, match="weight is on meta"):
        aggregate_bn_relu_train(*a.values(), **kw)
    a, kw = _args(children=[torch.randn(2, 8, 5, 5), torch.randn(2, 24, 5, 5, device="meta")])
    with pytest.raises(ValueError, match=r"children\[1\] is on meta"):
        aggregate_bn_relu_train(*a.values(), **kw)


@needs_triton
def test_triton_refuses_float64_clearly():
    a, kw = _args(backend="triton")
    a["children"] = [c.double() for c in a["children"]]
    a["weight"] = a["weight"].double()
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: .*float64"):
        aggregate_bn_relu_train(*a.values(), **kw)


def test_eager_is_the_reference_and_auto_falls_back_on_cpu():
    """backend='eager' and (on a CPU) 'auto' are DlaRoot's sequence, bit for bit, running statistics included."""
    root = _root(seed=9)
    kids = [torch.randn(2, c, 5, 5) for c in (8, 8, 16)]
    bn = root.bn
    outs = []
    for backend in ("eager", "auto"):
        rm, rv, n = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
        y = aggregate_bn_relu_train(kids, root.conv.weight, bn.weight, bn.bias, rm, rv, n, shortcut=True,
                                    backend=backend)
        outs.append((y, rm, rv, n))
    y_timm = _timm_root_forward(root, kids)
    for y, rm, rv, n in outs:
        assert torch.equal(y, y_timm)
        assert torch.equal(rm, bn.running_mean) and torch.equal(rv, bn.running_var) and n.item() == 1


_PLAIN_CPU = """
    import torch
    from dla_fast.train import aggregate_bn_relu_train
    kids = [torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)]
    try:
        aggregate_bn_relu_train(kids, torch.randn(8, 16, 1, 1), None, None, backend="triton")
    except RuntimeError as e:
        assert "TRITON_INTERPRET" in str(e), str(e)
    else:
        raise AssertionError("no error")
    print("OK")
"""


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU without the interpreter")
def test_plain_cpu_without_interpreter():
    p = _run_py(_PLAIN_CPU)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr


@pytest.mark.interpreter
@needs_kernels
def test_opcheck():
    """The registered agg_stats op's schema and fake implementation (what torch.compile traces); its annotated
    implementation is among those test_train_ops.test_schemas_are_what_triton_op_infers checks."""
    from dla_fast.backends.triton import _train  # registers the ops
    assert _train._IMPLS["agg_stats"] is _train._agg_stats_op and "agg_stats" in _train._SCHEMAS
    gen = torch.Generator().manual_seed(90)
    kids = [torch.randn(2, c, 4, 5, generator=gen).to(DEV) for c in (8, 3, 16)]
    w = (torch.randn(8, 27, 1, 1, generator=gen) * 0.2).to(DEV)
    torch.library.opcheck(torch.ops.dla_fast_train.agg_stats.default, (kids, w, False))


@pytest.mark.interpreter
@needs_kernels
def test_torch_compile_module():
    """torch.compile around TrainAggregate (graph capture through AggStats/BnAct and the registered agg_stats op;
    eager and aot_eager backends here, Inductor in the cuda test): the numbers of the uncompiled module."""
    def run(compiled):
        root = _root(seed=4)
        root.to(DEV)
        m = TrainAggregate.from_root(root, backend="triton")
        f = torch.compile(m, backend=compiled, fullgraph=False) if compiled else m
        gen = torch.Generator().manual_seed(91)
        kids = [torch.randn(2, c, 5, 5, generator=gen).to(DEV).requires_grad_() for c in (8, 8, 16)]
        y = f(kids)
        (y * y).sum().backward()
        return [y.detach(), *(k.grad for k in kids), root.conv.weight.grad, root.bn.weight.grad,
                root.bn.bias.grad, root.bn.running_mean, root.bn.running_var, root.bn.num_batches_tracked]

    expect = run(None)
    names = ("y", "kids[0].grad", "kids[1].grad", "kids[2].grad", "conv.weight.grad", "bn.weight.grad",
             "bn.bias.grad", "running_mean", "running_var", "num_batches_tracked")
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        for name, a, b in zip(names, run(backend), expect):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name, backend=backend: f"{name}, backend={backend}: {m}")


def test_double_backward_is_refused():
    """AggStats' backward is not differentiable itself: a double backward raises instead of being wrong."""
    kids = [torch.randn(2, c, 3, 3, dtype=torch.float64, requires_grad=True) for c in (4, 4)]
    w = torch.randn(4, 8, 1, 1, dtype=torch.float64, requires_grad=True)
    z, _, _ = ag.AggStats.apply("torch", None, False, w, *kids)
    (gk,) = torch.autograd.grad((z * z).sum(), (kids[1],), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gk.sum().backward()


# --------------------------------------------------------------------------------- DLA shapes on a GPU

# (N, children's channels, Cout, H, shortcut): dla34's level-2/3/4/5 roots (two children, the first the
# shortcut), a three-child root, dla102's level-3 root with a level root's extra child, a 6-child root.
CUDA_SHAPES = [
    (8, (64, 64), 64, 56, True), (8, (128, 128), 128, 28, True), (8, (256, 256, 128), 256, 14, True),
    (8, (512, 512, 256), 512, 7, False), (8, (128, 128, 64, 128), 128, 28, False),
    (8, (256, 256, 256, 256, 128, 256), 256, 14, True),
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_ID)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"{'+'.join(map(str, s[1]))}-{s[2]}@{s[3]}")
def test_dla_roots_autocast_cuda(shape, dtype):
    """DLA root shapes under CUDA autocast, channels_last children, backend='auto' (which must pick the
    kernels), against eager autocast and float64."""
    N, chans, Cout, H, short = shape
    case = AggCase(N, chans, Cout, H, H, shortcut=short, seed=7, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        assert train_ops.aggregate_unavailable_reason(case.kids, case.w, "auto") is None
    _compare(case, dtype, f"{shape}", backend="auto", autocast=True, layouts=["cl"] * len(chans))


@pytest.mark.cuda
@needs_cuda
def test_auto_falls_back_for_many_children_cuda(monkeypatch):
    """Nine children (more than the kernel reads) under bf16 autocast: 'auto' runs the eager node, the same
    numbers as backend='eager' bit for bit (cuDNN deterministic, so two eager runs agree bitwise)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    case = AggCase(4, (32,) * 9, 32, 14, 14, shortcut=True, seed=9, device="cuda")
    a = case.run("auto", torch.bfloat16, autocast=True)
    b = case.run("eager", torch.bfloat16, autocast=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.cuda
@needs_cuda
def test_deterministic_cuda():
    """Two steps on the same inputs give bit-identical outputs, gradients and statistics."""
    case = AggCase(8, (256, 256, 128), 256, 14, 14, shortcut=True, seed=8, device="cuda")
    a = case.run("triton", torch.bfloat16, autocast=True, layouts=["cl"] * 3)
    b = case.run("triton", torch.bfloat16, autocast=True, layouts=["cl"] * 3)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_module_cuda(backend):
    """torch.compile around TrainAggregate under bf16 autocast: the kernels traced through the registered ops;
    output, gradients and running statistics judged like the uncompiled module (eager autocast and float64 as
    references). The traced path finishes BN with torch ops, the uncompiled one in the statistics' final launch,
    so the two round differently: each is judged against float64, not against the other."""
    def run(kind, dt=torch.bfloat16):
        root = _root(chans=(64, 64), cout=64, seed=3)
        root.cuda()
        if dt == torch.float64:
            root.double()
        m = TrainAggregate.from_root(root, backend="eager" if kind == "eager" else "triton")
        f = torch.compile(m, backend=backend) if kind == "compiled" else m
        gen = torch.Generator().manual_seed(24)
        kids = [torch.randn(8, 64, 28, 28, generator=gen).cuda().to(dt if dt == torch.float64 else torch.float32)
                .contiguous(memory_format=torch.channels_last) for _ in range(2)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dt != torch.float64):
            y = f(kids)
        (y.float() ** 2).sum().backward()
        return dict(y=y.detach(), dw=root.conv.weight.grad, dgamma=root.bn.weight.grad, dbeta=root.bn.bias.grad,
                    rm=root.bn.running_mean, rv=root.bn.running_var), root.bn.num_batches_tracked.item()

    ours, n_ours = run("compiled")
    torch._dynamo.reset()
    eager, _ = run("eager")
    ref, n_ref = run("eager", torch.float64)
    assert n_ours == n_ref == 1
    for k in ours:
        _judge(f"compiled {backend} {k}", ours[k], eager[k], ref[k], torch.bfloat16)
