"""ffkern.train.attention.SelfAttention against nn.MultiheadAttention: same weights from the same
seed, same state-dict keys, same outputs and gradients."""
import pytest
import torch

from ffkern.train.attention import SelfAttention, StockSelfAttention


def test_same_initial_weights_and_keys():
    torch.manual_seed(3)
    stock = torch.nn.MultiheadAttention(48, 4, batch_first=True)
    torch.manual_seed(3)
    ours = SelfAttention(48, 4)
    assert list(ours.state_dict()) == list(stock.state_dict())
    for (k, a), b in zip(ours.state_dict().items(), stock.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("shape", [(3, 7, 48), (2, 1, 48), (1, 65, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_and_gradients_match_multihead_attention(shape, dtype):
    torch.manual_seed(0)
    ours = SelfAttention(48, 4).to(dtype)
    stock = StockSelfAttention(48, 4).to(dtype)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(*shape, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), stock(xb)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ya, yb, **tol)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (name, p), q in zip(ours.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{name}: {m}")


def test_width_must_divide_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention(50, 4)
