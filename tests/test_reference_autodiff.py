"""Backend "reference" (plain PyTorch) in every autodiff mode: double backward (float64 gradgradcheck),
forward mode (jvp against central finite differences, by torch.func.jvp and by
torch.autograd.forward_ad), torch.func.grad, and vmap against a loop. It is what the message of the
other backends' refusals points to (test_cpp_ops.py), so it must hold here.

Tiny float64 sizes; inputs are chosen away from the kinks of the losses (a positive pair exactly at
the margin clip, an SFFA share at its clamp), where no derivative exists.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import ffkern


def case(name):
    """(f(t) -> tensor, t): a public reference loss of one float64 input."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1])  # sample 3 (label 2) has only its other view
    flat = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    y_flat = torch.tensor([0, 1, 0, 1, 2, 2, 3])  # row 6 has no positive at all
    h = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64)
    other = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64)
    hd = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    ref = {"backend": "reference"}
    cases = {
        "supcon-mean-m0": (lambda t: ffkern.marginal_supcon_loss(t, y, **ref), x),
        "supcon-none-m0.4": (lambda t: ffkern.marginal_supcon_loss(t, y, margin=0.4, reduction="none", **ref), x),
        "supcon-simclr-base": (lambda t: ffkern.marginal_supcon_loss(t, None, margin=0.2, base_temperature=0.07, **ref),
                               x),
        "supcon-flat-unnormalized": (
            lambda t: ffkern.marginal_supcon_loss(t, y_flat, temperature=0.5, margin=0.4, normalize=False,
                                                  reduction="sum", **ref), 0.5 * flat),
        "goodness-mean-skip1": (lambda t: ffkern.ff_goodness(t, skip_tokens=1, **ref), h),
        "goodness-sum-BD": (lambda t: ffkern.ff_goodness(t, kind="sum", **ref), hd),
        "ff": (lambda t: ffkern.ff_loss(t, other, threshold=1.0, skip_tokens=1, **ref), h),
        "ff-neg": (lambda t: ffkern.ff_loss(other, t, threshold=1.0, kind="sum", **ref), h),
        "symba": (lambda t: ffkern.symba_loss(t, other, alpha=2.0, **ref), h),
        "sffa": (lambda t: ffkern.sffa_loss(t, hd.flip(0), **ref), hd),
        "sffa-tokens": (lambda t: ffkern.sffa_loss(other, t, skip_tokens=1, **ref), h),
    }
    return cases[name]


CASES = ["supcon-mean-m0", "supcon-none-m0.4", "supcon-simclr-base", "supcon-flat-unnormalized",
         "goodness-mean-skip1", "goodness-sum-BD", "ff", "ff-neg", "symba", "sffa", "sffa-tokens"]


@pytest.mark.parametrize("name", CASES)
def test_gradgradcheck(name):
    f, t = case(name)
    t = t.clone().requires_grad_(True)
    torch.autograd.gradcheck(f, (t,))
    torch.autograd.gradgradcheck(f, (t,))


def finite_difference(f, t, v, eps=1e-6):
    with torch.no_grad():
        return (f(t + eps * v) - f(t - eps * v)) / (2 * eps)


@pytest.mark.parametrize("name", CASES)
def test_jvp_matches_finite_differences(name):
    f, t = case(name)
    v = torch.randn(t.shape, generator=torch.Generator().manual_seed(9), dtype=t.dtype)
    expected = finite_difference(f, t, v)
    out, tangent = torch.func.jvp(f, (t,), (v,))
    torch.testing.assert_close(out, f(t), rtol=0, atol=0)
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-8)
    with fwAD.dual_level():
        dual_tangent = fwAD.unpack_dual(f(fwAD.make_dual(t, v))).tangent
    assert dual_tangent is not None
    torch.testing.assert_close(dual_tangent, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", CASES)
def test_func_grad_and_vmap(name):
    f, t = case(name)
    leaf = t.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(f(leaf).sum(), leaf)
    torch.testing.assert_close(torch.func.grad(lambda u: f(u).sum())(t), expected, rtol=1e-12, atol=1e-12)
    batch = torch.stack([t, 0.5 * t + 0.25, -t])
    torch.testing.assert_close(torch.func.vmap(f)(batch), torch.stack([f(u) for u in batch]), rtol=1e-12, atol=1e-12)
