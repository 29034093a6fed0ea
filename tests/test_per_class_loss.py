"""The per-class goodness loss (SPEC 2.2): values against a hand-written formula, float64
gradcheck in both memory layouts, the backends' rule, the module."""
import math

import pytest
import torch
import torch.nn.functional as F

import ffkern
from ffkern import BackendUnavailable, PerClassGoodnessLoss, class_goodness, per_class_goodness_loss


def inputs(b=5, c=6, k=4, hw=(3, 2), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, c, *hw, generator=g, dtype=dtype)
    w = torch.randn(k, c, generator=g, dtype=dtype) / math.sqrt(c)
    bias = torch.randn(k, generator=g, dtype=dtype)
    y = torch.randint(0, k, (b,), generator=g)
    return h, w, bias, y


def by_hand(h, w, bias, y, scale):
    z = F.conv2d(h, w[:, :, None, None], bias)  # the 1x1 convolution
    g = z.square().flatten(2).mean(2)  # [B, K]: spatial mean of squares per class channel
    return F.cross_entropy(scale * g, y, reduction="none")


@pytest.mark.parametrize("with_bias", [False, True])
def test_values_match_the_formula(with_bias):
    h, w, bias, y = inputs()
    bias = bias if with_bias else None
    want = by_hand(h, w, bias, y, 0.7)
    got = per_class_goodness_loss(h, w, y, bias=bias, scale=0.7, reduction="none")
    assert torch.allclose(got, want, rtol=1e-12)
    assert torch.allclose(per_class_goodness_loss(h, w, y, bias=bias, scale=0.7), want.mean(), rtol=1e-12)
    assert torch.allclose(per_class_goodness_loss(h, w, y, bias=bias, scale=0.7, reduction="sum"), want.sum(), rtol=1e-12)
    z = F.conv2d(h, w[:, :, None, None], bias)
    assert torch.allclose(class_goodness(h, w[:, :, None, None], bias), z.square().mean((2, 3)), rtol=1e-12)


def test_float32_and_channels_last_agree():
    h, w, bias, y = inputs(dtype=torch.float32)
    cl = h.contiguous(memory_format=torch.channels_last)
    a = per_class_goodness_loss(h, w, y, bias=bias, reduction="none")
    assert a.dtype == torch.float32
    assert torch.allclose(per_class_goodness_loss(cl, w, y, bias=bias, reduction="none"), a, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 inside autocast too
        assert per_class_goodness_loss(h, w, y).dtype == torch.float32


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_float64(layout):
    h, w, bias, y = inputs(b=3, c=4, k=3, hw=(2, 2))
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    scale = torch.tensor(0.8, dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (h, w, bias, scale)]
    if layout == "channels_last":
        args[0] = h.clone(memory_format=torch.channels_last).requires_grad_(True)
    fn = lambda h, w, b, s: per_class_goodness_loss(h, w, y, bias=b, scale=s)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_backends_rule(monkeypatch):
    h, w, _, y = inputs(dtype=torch.float32)
    ref = per_class_goodness_loss(h, w, y, backend="reference")
    assert torch.equal(per_class_goodness_loss(h, w, y, backend="auto"), ref)  # auto: the reference everywhere

    class NoKernel:  # a backend without the per-class kernel (as triton and cpp are today)
        name = "cpp"

    import ffkern.per_class as per_class

    monkeypatch.setattr(per_class, "resolve", lambda backend, device: NoKernel())
    with pytest.raises(BackendUnavailable, match="no per-class goodness kernel"):
        per_class_goodness_loss(h, w, y, backend="cpp")
    with pytest.raises(ValueError, match="backend must be"):
        per_class_goodness_loss(h, w, y, backend="fast")


def test_checks():
    h, w, bias, y = inputs()
    with pytest.raises(ValueError, match="input channels"):
        per_class_goodness_loss(h, w[:, :3], y)
    with pytest.raises(ValueError, match=r"\[0, K\)"):
        per_class_goodness_loss(h, w, y + 10)
    with pytest.raises(ValueError, match="K >= 2"):
        per_class_goodness_loss(h, w[:1], torch.zeros_like(y))
    with pytest.raises(ValueError, match="feature map"):
        per_class_goodness_loss(h.flatten(1), w, y)
    with pytest.raises(ValueError, match="scale"):
        per_class_goodness_loss(h, w, y, scale=0.0)
    with pytest.raises(ValueError, match="bias"):
        per_class_goodness_loss(h, w, y, bias=bias[:2])


def test_module_learns_its_scale_and_conv():
    torch.manual_seed(0)
    h, _, _, y = inputs(dtype=torch.float32)
    crit = PerClassGoodnessLoss(6, 4, scale=2.0, learnable_scale=True)
    assert float(crit.scale.detach()) == pytest.approx(2.0)
    loss = crit(h, y)
    loss.backward()
    assert crit.log_scale.grad is not None and crit.proj.weight.grad is not None
    want = by_hand(h.double(), crit.proj.weight[:, :, 0, 0].double().detach(), None, y, 2.0).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert crit.logits(h).shape == (5, 4)
    fixed = PerClassGoodnessLoss(6, 4)
    assert "log_scale" in dict(fixed.named_buffers()) and not any("scale" in n for n, _ in fixed.named_parameters())
    assert ffkern.PerClassGoodnessLoss is PerClassGoodnessLoss
