"""dla_fast.memory: the activation tracer is exact on hand-counted modules, and the optimized DLA frees every
activation right after its last reader. CPU tests trace on the meta device (seconds); the `cuda` tests compare
with what the caching allocator reports on a GPU."""
import pytest
import torch
import torch.nn as nn

import dla_fast
from dla_fast import memory
from dla_fast.fuse import CudaGraphRunner, FusedDLA

from helpers import timm_or_skip

F32 = 4  # bytes


class Tiny(nn.Module):
    """Every allocation counted by hand below: a conv, a new tensor, an in-place op, a view, a freed temporary."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)

    def forward(self, x):
        a = self.conv(x)        # 2x8x16x16: 4096 floats
        b = torch.relu(a)       # 4096 floats, new
        b.relu_()               # in place: nothing allocated
        c = b[:, :4]            # a view: nothing allocated
        d = c * 2               # 2048 floats
        del a                   # a's last reader was relu: freed only now, after d was allocated
        e = torch.cat([b, d], 1)  # 6144 floats; a is gone, b and d alive: the peak
        del b, c, d
        return e.sum()          # 1 float, returned


def _tiny_report():
    return memory.trace(Tiny(), (2, 3, 16, 16), torch.float32, channels_last=False)


def _op(a):
    return "conv" if a.op in ("conv2d", "convolution") else a.op  # the name depends on torch's dispatch


def test_tracer_counts_a_hand_made_module_exactly():
    rep = _tiny_report()
    sizes = [(_op(a), a.nbytes) for a in rep.allocations]
    assert sizes == [("conv", 4096 * F32), ("relu", 4096 * F32), ("mul", 2048 * F32), ("cat", 6144 * F32),
                     ("sum", 1 * F32)], sizes
    assert rep.peak_bytes == (4096 + 2048 + 6144) * F32  # b, d, e; a was freed before the cat
    assert [a.op for a in rep.live_at_peak()] == ["relu", "mul", "cat"]
    assert rep.peak_allocation().op == "cat"
    assert rep.input_bytes == 2 * 3 * 16 * 16 * F32 and rep.weight_bytes == 8 * 3 * 3 * 3 * F32
    assert [a.op for a in rep.alive_at_end()] == ["sum"]  # the returned value
    assert rep.total_bytes == (4096 + 4096 + 2048 + 6144 + 1) * F32
    # module names: the conv's output is attributed to the submodule that made it
    assert rep.allocations[0].module == "conv" and rep.allocations[1].label == "<top>: relu"
    assert memory.peak_activation_bytes(Tiny(), (2, 3, 16, 16), torch.float32, channels_last=False) == rep.peak()


def test_tracer_knows_last_readers():
    rep = _tiny_report()
    a, b, d, e, s = rep.allocations
    # a is read last by relu (made at b's tick) but freed after d was made: it outlived its last reader
    assert a.last_use == b.start and a.end > d.start
    assert rep.outlived() == [a]
    assert rep.stale_at_peak() == []  # a is gone by the peak
    # freed at their last reads instead, the peak is the same: b, d and e must coexist for the cat
    assert rep.peak(ideal=True) == rep.peak()
    # d read by the cat, e by the sum, b by the mul (the view c) and the cat
    assert d.last_use == e.start and e.last_use == s.start and b.last_use == e.start


def test_tracer_peak_recomputed_without_excluded_allocations():
    rep = _tiny_report()
    without_cat = rep.peak(lambda a: a.op == "cat")
    # then the peak is a, b and d alive together when d is made
    assert without_cat == (4096 + 4096 + 2048) * F32
    assert rep.peak_allocation(lambda a: a.op == "cat").op == "mul"


class Pair(nn.Module):
    """Two 'kernels' whose eager insides make temporaries a fused kernel would not."""

    def __init__(self):
        super().__init__()
        self.k1 = Inner()
        self.k2 = Inner()

    def forward(self, x):
        return self.k2(self.k1(x))


class Inner(nn.Module):
    def forward(self, x):
        t = x * 3               # a temporary
        return t + 1            # the output


def test_opaque_modules_count_only_their_outputs():
    x = torch.empty(4, 256, device="meta")
    model = Pair()
    with memory.ActivationTracer(model, opaque=lambda m, args, kwargs: isinstance(m, Inner)) as tr:
        out = model(x)
    rep = tr.report()
    assert [(a.label, a.nbytes) for a in rep.allocations] == [("k1: Inner", 4 * 256 * F32),
                                                               ("k2: Inner", 4 * 256 * F32)]
    # k1's output is read by k2, which makes its own output while it is alive
    assert rep.peak() == 2 * 4 * 256 * F32
    with memory.ActivationTracer(model) as tr:  # traced op by op: the temporaries count
        out = model(x)
    assert [a.label for a in tr.report().allocations] == ["k1: mul", "k1: add", "k2: mul", "k2: add"]
    del out


def test_tracer_runs_on_real_cpu_tensors_too():
    model, x = Tiny(), torch.randn(2, 3, 16, 16)
    with torch.inference_mode(), memory.ActivationTracer(model) as tr:
        model(x)
    assert tr.report().peak() == _tiny_report().peak()


def test_trace_leaves_the_model_alone():
    model = Tiny()
    w = model.conv.weight.detach().clone()
    memory.trace(model, (2, 3, 16, 16), torch.float16)
    assert model.conv.weight.device.type == "cpu" and model.conv.weight.dtype == torch.float32
    assert model.conv.weight.is_contiguous()  # not made channels_last
    assert torch.equal(model.conv.weight, w)
    fused = dla_fast.optimize(dla_fast.create_model("dla34").eval(), dtype=torch.float32, backend="eager")
    forward = fused.level2.tree1.conv1.forward
    memory.trace(fused, (2, 3, 64, 64), torch.float32)
    assert fused.weight_device().type == "cpu" and fused.level2.downsample._device.type == "cpu"
    assert fused.level2.tree1.conv1.forward == forward  # the eager-path forward went onto the copy only


def test_trace_bad_arguments():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        memory.trace(lambda x: x, (1, 3, 32, 32))
    with pytest.raises(ValueError, match="four positive ints"):
        memory.trace(Tiny(), (1, 3, 32))
    with pytest.raises(ValueError, match="four positive ints"):
        memory.trace(Tiny(), (0, 3, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        memory.trace(Tiny(), (1, 3, 32, 32), torch.int8)
    fused = FusedDLA(_meta_model("dla34"), torch.float16, "cuda")
    with pytest.raises(ValueError, match="built for torch.float16"):
        memory.trace(fused, (1, 3, 32, 32), torch.float32)
    with pytest.raises(TypeError, match="runner.module"):
        memory.trace(CudaGraphRunner(fused), (1, 3, 32, 32), torch.float16)


# ------------------------------------------------------------------------------------------ the DLA models

BATCH, HW = 256, 224


def _meta_model(name):
    with torch.device("meta"):
        return dla_fast.create_model(name).eval()


def _fused_report(name, backend):
    return memory.trace(FusedDLA(_meta_model(name), torch.float16, backend), (BATCH, 3, HW, HW), torch.float16,
                        title=f"{name} {backend}")


def _map(c, h, batch=BATCH):
    return batch * c * h * h * 2  # fp16 bytes of a batch x c x h x h map


def test_timm_eager_dla34_peak_is_three_full_resolution_maps():
    """timm's stem BN output, level 0's conv output and level 0's BN output coexist: 3 x 16 x 224 x 224 halves
    per image (the 1280 MiB measured on the H100 at batch 256 is these, the input and the weights)."""
    timm = timm_or_skip()
    with torch.device("meta"):
        ref = timm.create_model("dla34")
    rep = memory.trace(ref, (BATCH, 3, HW, HW), torch.float16)
    assert rep.peak() == 3 * _map(16, 224)
    assert [a.module for a in rep.live_at_peak()] == ["base_layer.1", "level0.0", "level0.1"]


@pytest.mark.parametrize("args, message", [
    (["dla35"], "unknown model"),
    (["dla34", "--batch", "0"], "positive"),
    (["dla34", "--hw", "100"], "32"),
    (["dla34", "--hw", "big"], "not H, HxW"),
])
def test_memory_cli_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        memory.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
