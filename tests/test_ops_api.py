"""The public functional ops (dla_fast.ops): arguments validated once, with messages that say what to change, the
same on every backend; the eager path computes the documented function."""
import pytest
import torch
import torch.nn.functional as F

from dla_fast import ops


def _x():
    return torch.randn(1, 8, 9, 9)


def _w(cout=8, cin=8, k=3):
    return torch.randn(cout, cin, k, k)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(stride=1.5), TypeError, "stride must be an int or a pair of ints, got 1.5"),
    (dict(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair of ints"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(padding=True), TypeError, "padding must be an int or a pair of ints, got True"),
    (dict(groups=True), ValueError, "groups must be a positive int, got True"),
    (dict(groups=3), ValueError, "expects 24"),
    (dict(relu=1), TypeError, "relu must be a bool"),
    (dict(residual=torch.randn(1, 8, 9, 8)), ValueError, "residual must have the output's shape"),
])
def test_conv_bn_act_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.conv_bn_act(_x(), _w(), **kwargs)


def test_conv_bn_act_bad_tensors():
    with pytest.raises(TypeError, match="bias must be a 1-D tensor of 8 values or None, got list"):
        ops.conv_bn_act(_x(), _w(), [0.0] * 8)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.conv_bn_act(_x(), _w(), torch.zeros(7))
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        ops.conv_bn_act(_x(), _w(), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"weight \(8, 0, 3, 3\) is empty"):
        ops.conv_bn_act(torch.randn(1, 0, 9, 9), torch.randn(8, 0, 3, 3))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.conv_bn_act(_x().long(), _w())
    with pytest.raises(ValueError, match="weight has dtype torch.float16 but the input x has torch.float32"):
        ops.conv_bn_act(_x(), _w().half())
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.conv_bn_act(_x(), _w(), backend="tensorrt")


def test_aggregate_arguments():
    kids = [torch.randn(1, 4, 5, 5), torch.randn(1, 6, 5, 5)]
    w = torch.randn(4, 10)
    ref = F.conv2d(torch.cat(kids, 1), w[:, :, None, None]).relu()
    # None and False both mean no residual, on every backend
    torch.testing.assert_close(ops.aggregate(kids, w, residual=None), ref)
    torch.testing.assert_close(ops.aggregate(kids, w, residual=False), ref)
    torch.testing.assert_close(ops.aggregate(kids, w, residual=True),
                               (F.conv2d(torch.cat(kids, 1), w[:, :, None, None]) + kids[0]).relu())
    with pytest.raises(TypeError, match="residual must be None, a bool or a tensor, got str"):
        ops.aggregate(kids, w, residual="yes")
    with pytest.raises(ValueError, match="children\\[1\\] has no channels"):
        ops.aggregate([kids[0], torch.randn(1, 0, 5, 5)], torch.randn(4, 4))
    with pytest.raises(TypeError, match="bias must be a 1-D tensor"):
        ops.aggregate(kids, w, bias=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="weight expects 9 input channels but the children have 4 \\+ 6 = 10"):
        ops.aggregate(kids, torch.randn(4, 9))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        ops.aggregate(kids, [[0.0] * 10] * 4)


def test_max_pool():
    x = torch.randn(2, 5, 9, 7)
    torch.testing.assert_close(ops.max_pool(x, 2), F.max_pool2d(x, 2, 2))
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        ops.max_pool(x, 0)
    with pytest.raises(ValueError, match="smaller than the 8x8 window"):
        ops.max_pool(x, 8)


def test_the_eager_op_is_the_documented_function():
    x, w, b = _x(), _w(cout=6), torch.randn(6)
    r = torch.randn(1, 6, 5, 5)
    y = ops.conv_bn_act(x, w, b, stride=2, padding=1, residual=r)
    torch.testing.assert_close(y, (F.conv2d(x, w, b, 2, 1) + r).relu())
    assert ops.backend_for("conv_bn_act", x) == "eager"
