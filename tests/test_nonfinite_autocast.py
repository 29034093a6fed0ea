"""NaN in, NaN out, huge rows normalized as in exact arithmetic, and the documented float32 loss
under autocast, in every backend."""
import math

import pytest
import torch

import ffkern
from conftest import backend_cases

BACKEND_CASES = backend_cases()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_sffa_non_finite_activation_gives_nan(backend, device, bad):
    """A NaN (or inf: q = inf / inf) activation must not pass for a "dead" all-zero sample with a
    finite loss; the other samples' gradients stay those of the reference."""
    gen = torch.Generator().manual_seed(0)
    h_pos = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    h_neg = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    h_pos[2, 1] = bad
    hp, hn = h_pos.to(device, copy=True).requires_grad_(), h_neg.to(device, copy=True).requires_grad_()
    loss = ffkern.sffa_loss(hp, hn, backend=backend)
    assert math.isnan(loss.item()), f"{backend}: sffa_loss with {bad} gave {loss.item()}"
    loss.backward()
    rp, rn = h_pos.detach().clone().requires_grad_(), h_neg.detach().clone().requires_grad_()
    ffkern.sffa_loss(rp, rn, backend="reference").backward()
    others = [0, 1, 3]
    torch.testing.assert_close(hp.grad[others].cpu(), rp.grad[others], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hn.grad.cpu(), rn.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend,device", [c for c in BACKEND_CASES if c.values[1] == "cpu"])
def test_losses_under_cpu_autocast_are_float32(backend, device):
    """Inside torch.autocast("cpu", torch.bfloat16) the loss is the documented float32 one,
    computed from the inputs' values (not from a bf16 similarity product)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, 32, generator=gen)
    labels = torch.randint(0, 5, (64,), generator=gen)
    h_pos, h_neg = torch.randn(16, 12, generator=gen), torch.randn(16, 12, generator=gen)
    plain = [ffkern.marginal_supcon_loss(x, labels, margin=0.3, backend=backend),
             ffkern.symba_loss(h_pos, h_neg, backend=backend),
             ffkern.sffa_loss(h_pos, h_neg, backend=backend)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = [ffkern.marginal_supcon_loss(x, labels, margin=0.3, backend=backend),
                 ffkern.symba_loss(h_pos, h_neg, backend=backend),
                 ffkern.sffa_loss(h_pos, h_neg, backend=backend)]
    for a, b in zip(plain, mixed):
        assert b.dtype == torch.float32, f"{backend}: {b.dtype} under autocast"
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ---- huge rows, non-finite rows: the same in every backend (SupCon normalizes each row) ------------------

HUGE_CASES = [(torch.float32, 64), (torch.float32, 100), (torch.float32, 126), (torch.bfloat16, 70),
              (torch.bfloat16, 126), (torch.float64, 600), (torch.float64, 1020)]


@pytest.mark.parametrize("dtype,k", HUGE_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_huge_rows_normalize_to_unit_vectors(backend, device, dtype, k):
    """A finite row of norm 2^k (beyond sqrt of the dtype's max: its squared norm overflows) is a
    unit vector, as in exact arithmetic: the loss is that of the row scaled down by 2^k (the same
    values, a power of two), and its gradient is that one's times 2^-k. Before, the reference and
    cpp made it the zero vector (a finite, wrong loss) and triton returned NaN."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    x[0] *= 1.5 / x[0].abs().max()  # max |x_0j| in [1, 2): times 2^k stays finite in every dtype
    labels = torch.tensor([0, 1, 0, 1, 2, 2], device=device)
    small = x.to(dtype).to(device)
    huge = small.clone()
    huge[0] = small[0] * 2.0 ** k
    assert torch.isfinite(huge).all()
    xs, xh = small.clone().requires_grad_(), huge.clone().requires_grad_()
    ls = ffkern.marginal_supcon_loss(xs, labels, margin=0.3, reduction="none", backend=backend)
    lh = ffkern.marginal_supcon_loss(xh, labels, margin=0.3, reduction="none", backend=backend)
    ls.sum().backward()
    lh.sum().backward()
    torch.testing.assert_close(lh, ls, rtol=0, atol=0)  # the same bits: power-of-two scaling is exact
    torch.testing.assert_close(xh.grad[1:], xs.grad[1:], rtol=0, atol=0)
    if k <= 100 or dtype == torch.float64:  # else the gradient, ~2^-k, is subnormal (a few bits) or 0
        got = xh.grad[0].double() * 2.0 ** k
        torch.testing.assert_close(got, xs.grad[0].double(), rtol=1e-6 if dtype == torch.float64 else 2e-2, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_non_finite_feature_makes_the_supcon_loss_nan(backend, device, bad):
    """A NaN or inf feature: its row is NaN once normalized, and every anchor's denominator holds
    it, so every per-anchor loss is NaN, in every backend (not a finite loss, not a silent zero)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=gen).to(device)
    x[2, 3] = bad
    x.requires_grad_()
    labels = torch.tensor([0, 1, 0, 1, 2, 2], device=device)
    loss = ffkern.marginal_supcon_loss(x, labels, reduction="none", backend=backend)
    assert torch.isnan(loss).all(), f"{backend}: {loss}"
    loss.sum().backward()
    assert torch.isnan(x.grad).all(), f"{backend}: gradient {x.grad}"
