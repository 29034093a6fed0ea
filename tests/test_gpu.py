"""Checks that only mean something on a GPU: large N (64-bit offsets, many tiles), TF32 mode.
They skip, with the reason shown, where CUDA is not available."""
import pytest
import torch

import ffkern
from ffkern import _backend, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


def chunked_reference_forward(z, labels, temperature, margin, chunk=4096):
    """The reference forward in anchor chunks (same formula, no N x N buffer at once)."""
    outs = [reference.supcon_forward(z[i:i + chunk], labels[i:i + chunk], z, labels, i, temperature, margin)
            for i in range(0, z.shape[0], chunk)]
    return [torch.cat(parts) for parts in zip(*outs)]


@pytest.mark.parametrize("backend", [b for b in _backend.BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_batch_matches_chunked_reference(backend, dtype):
    torch.manual_seed(0)
    n, d = 50_000, 128  # N^2 > 2^31
    z = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1).to(dtype)
    labels = torch.randint(0, 100, (n,), device="cuda")
    impl = _backend.resolve(backend, z.device)
    loss, lse, npos, _ = impl.supcon_forward(z, labels, z, labels, 0, 0.15, 0.4)
    ref_loss, ref_lse, ref_npos, _ = chunked_reference_forward(z.float(), labels, 0.15, 0.4)
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    assert torch.equal(npos, ref_npos)


@pytest.mark.parametrize("backend", [b for b in _backend.BACKENDS if b != "reference"])
def test_tf32_mode_close_to_ieee(backend):
    torch.manual_seed(0)
    x = torch.randn(1024, 2, 128, device="cuda", requires_grad=True)
    labels = torch.randint(0, 10, (1024,), device="cuda")
    old = torch.get_float32_matmul_precision()
    try:
        results = []
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            x.grad = None
            loss = ffkern.marginal_supcon_loss(x, labels, margin=0.4, backend=backend)
            loss.backward()
            results.append((loss.detach(), x.grad.clone()))
    finally:
        torch.set_float32_matmul_precision(old)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=5e-2, atol=1e-4)


def test_auto_picks_a_fused_backend_on_cuda():
    assert _backend.resolve("auto", torch.device("cuda")).name != "reference"
