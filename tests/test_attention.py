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


def test_packed_cpu_path_is_taken_and_equals_sdpa(monkeypatch):
    """Training on the CPU in fp32 goes through _PackedCpuAttention (the gradient in the packed
    layout in one pass); its values and gradients are SDPA's exactly (the same kernel)."""
    from ffkern.train import attention

    torch.manual_seed(1)
    layer = SelfAttention(64, 4)
    x = torch.randn(3, 16, 64)
    calls = []
    real = attention._PackedCpuAttention.apply
    monkeypatch.setattr(attention._PackedCpuAttention, "apply", lambda qkv: calls.append(1) or real(qkv))

    def run():
        layer.zero_grad()
        y = layer(x)
        y.backward(torch.ones_like(y))
        return y.detach(), [p.grad.clone() for p in layer.parameters()]

    y_packed, g_packed = run()
    assert calls, "the packed CPU path was not taken"
    monkeypatch.setattr(attention, "_packed_path", lambda qkv: False)
    calls.clear()
    y_sdpa, g_sdpa = run()
    assert not calls
    assert torch.equal(y_packed, y_sdpa)
    for a, b in zip(g_packed, g_sdpa):
        assert torch.equal(a, b)


def test_packed_cpu_path_refuses_double_backward_and_forward_ad_like_sdpa():
    """SDPA's CPU kernel has neither a double backward nor a forward-AD rule; the packed path
    raises for both as stock nn.MultiheadAttention does, never returns a wrong derivative."""
    import torch.autograd.forward_ad as fwAD

    layer = SelfAttention(32, 4)
    x = torch.randn(2, 8, 32, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.square().sum().backward()
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
        layer(fwAD.make_dual(x.detach(), torch.randn_like(x)))
