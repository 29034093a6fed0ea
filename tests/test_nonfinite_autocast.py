"""NaN in, NaN out, and the documented float32 loss under autocast, in every backend."""
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
