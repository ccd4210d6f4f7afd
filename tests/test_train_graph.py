"""A training step captured in a CUDA graph (``dla_fast.train.graph.CapturedTrainStep``): the argument errors on
the CPU; on a GPU, the captured fused step against the same step uncaptured (same kernels, same order: the same
numbers), the model's buffers untouched by the capture's warm-up, timm's eager model captured too, and a model that
synchronises with the host refused with the reason."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dla_fast
from dla_fast.train.graph import CapturedTrainStep
from dla_fast.verify import calibrated_random_weights, rel_err

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERP,
                                reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


def _ce(out, target):
    return F.cross_entropy(out.float(), target)


def test_argument_errors():
    model = nn.Linear(4, 2)
    x, t = torch.randn(3, 4), torch.randint(0, 2, (3,))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        CapturedTrainStep(lambda v: v, _ce, x, t)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        CapturedTrainStep(model, None, x, t)
    with pytest.raises(TypeError, match="example_target must be a tensor"):
        CapturedTrainStep(model, _ce, x, [0, 1, 0])
    with pytest.raises(ValueError, match="runs on CUDA; example_inputs is on cpu: move the model and the batch"):
        CapturedTrainStep(model, _ce, x, t)
    if torch.cuda.is_available():  # the checks past the device's
        xc, tc = x.cuda(), t.cuda()
        with pytest.raises(ValueError, match="amp_dtype must be None, torch.float16 or torch.bfloat16"):
            CapturedTrainStep(model.cuda(), _ce, xc, tc, amp_dtype=torch.float64)
        with pytest.raises(ValueError, match="warmup must be an int >= 1"):
            CapturedTrainStep(model.cuda(), _ce, xc, tc, warmup=0)
        with pytest.raises(ValueError, match="are not on cuda:0, where the example batch is"):
            CapturedTrainStep(nn.Linear(4, 2), _ce, xc, tc)
        with pytest.raises(ValueError, match="no parameter that requires grad"):
            CapturedTrainStep(nn.Linear(4, 2).cuda().requires_grad_(False), _ce, xc, tc)


def _dla(name="dla46_c"):
    torch.manual_seed(0)
    return calibrated_random_weights(dla_fast.create_model(name), 0).cuda().to(memory_format=torch.channels_last)


def _batch(n=8, hw=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, hw, hw, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (n,), generator=gen).cuda()


def _sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "modules"])
def test_captured_step_equals_the_uncaptured_step_cuda(fused):
    """Three SGD steps on three batches, captured and not, under bf16 autocast: the same kernels in the same
    order, so the same losses, parameters and BN statistics (to rounding: 1e-5, far below bf16's own 4e-3)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    base = _dla().train()
    if fused:
        base.set_fused_training(True, backend="triton")
    plain, graphed = copy.deepcopy(base), copy.deepcopy(base)
    batches = [_batch(seed=s) for s in (1, 2, 3)]
    before = [b.clone() for b in graphed.buffers()]
    step = CapturedTrainStep(graphed, _ce, *batches[0], amp_dtype=torch.bfloat16)
    # the warm-up ran steps on the example batch: every buffer is back, the parameters never moved
    assert all(torch.equal(a, b) for a, b in zip(graphed.buffers(), before))
    assert all(torch.equal(a, b) for a, b in zip(graphed.parameters(), base.parameters()))
    opt_p, opt_g = _sgd(plain), _sgd(graphed)
    for i, (x, t) in enumerate(batches):
        opt_p.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp = _ce(plain(x), t)
        lp.backward()
        opt_p.step()
        if i == 1:
            opt_g.zero_grad(set_to_none=True)  # harmless: the call re-attaches its gradients
        lg = step(x, t)
        assert all(p.grad is not None for p in graphed.parameters())
        opt_g.step()
        assert rel_err(lg, lp.detach()) < 1e-5, (i, lg.item(), lp.item())
    assert max(rel_err(a, b) for a, b in zip(graphed.parameters(), plain.parameters())) < 1e-5
    for a, b in zip(graphed.buffers(), plain.buffers()):
        assert torch.equal(a, b) if a.dtype == torch.long else rel_err(a, b) < 1e-5
    assert int(graphed.base_layer[1].num_batches_tracked) == int(before[2]) + 3
    with pytest.raises(ValueError, match=r"captured for inputs of shape \(8, 3, 64, 64\).*got shape \(4, 3, 64, 64\)"):
        step(batches[0][0][:4], batches[0][1])
    # the examples were copied: the graph's batch is its own; donated, the examples are the graph's batch
    assert step.inputs.data_ptr() != batches[0][0].data_ptr()
    x, t = _batch(seed=4)
    fresh = copy.deepcopy(base)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expect = _ce(fresh(x), t).detach()
    donated = CapturedTrainStep(copy.deepcopy(base), _ce, x, t, amp_dtype=torch.bfloat16, donate_examples=True)
    assert donated.inputs is x and donated.target is t
    assert rel_err(donated(x, t), expect) < 1e-5


@pytest.mark.cuda
@needs_cuda
def test_timm_model_captured_cuda():
    timm = pytest.importorskip("timm")
    ours = _dla("dla34")
    m = timm.create_model("dla34").cuda().to(memory_format=torch.channels_last)
    m.load_state_dict(ours.state_dict())
    plain = copy.deepcopy(m)
    x, t = _batch()
    step = CapturedTrainStep(m, _ce, x, t, amp_dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lp = _ce(plain(x), t)
    lp.backward()
    assert rel_err(step(x, t), lp.detach()) < 1e-5
    assert max(rel_err(p.grad, q.grad) for p, q in zip(m.parameters(), plain.parameters())) < 1e-5


@pytest.mark.cuda
@needs_cuda
def test_host_sync_is_refused_with_the_reason_cuda():
    """BatchNorm with momentum=None reads its counter on the host every step: refused before any capture starts
    (a failed capture leaves torch's CUDA generator unusable in the process), saying why; the model's buffers are
    as before, and CUDA random numbers still work."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=None), nn.Flatten(), nn.LazyLinear(10)).cuda()
    x, t = torch.randn(4, 3, 8, 8, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    m(x)  # the lazy layer's shape
    before = [b.clone() for b in m.buffers()]
    with pytest.raises(RuntimeError, match="(?s)synchronises with the host, so it cannot be captured.*momentum=None"):
        CapturedTrainStep(m, F.cross_entropy, x, t)
    assert all(torch.equal(a, b) for a, b in zip(m.buffers(), before))
    assert torch.randn(3, device="cuda").isfinite().all()
