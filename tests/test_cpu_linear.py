"""ffkern.train.cpu_linear: the same values and derivatives as F.linear in every mode, the bias
added inside oneDNN's product only where that path is taken (fp32 CPU, large outputs)."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from ffkern.train import cpu_linear
from ffkern.train.cpu_linear import Linear, linear

needs_onednn = pytest.mark.skipif(not cpu_linear._ONEDNN, reason="torch built without oneDNN: F.linear everywhere")
BIG = (2, 2048, 96)  # 4096 rows x 256 outputs = 2^20 output elements: the fast path's threshold


def _inputs(shape=BIG, out=256, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(out, shape[-1], generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(out, generator=g, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


@pytest.fixture
def count_fast(monkeypatch):
    calls = []
    real = cpu_linear._BiasInGemmLinear.apply
    monkeypatch.setattr(cpu_linear._BiasInGemmLinear, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_f_linear(bias, count_fast):
    x, w, b = _inputs(bias=bias)
    params = [x, w] + ([b] if bias else [])
    y = linear(x, w, b)
    assert count_fast, "the oneDNN path was not taken for a 2^20-element fp32 output"
    y_ref = F.linear(x, w, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(y_ref, params, g)
    for name, a, e in zip("xwb", got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@needs_onednn
def test_non_contiguous_input_and_partial_gradients(count_fast):
    x, _, b = _inputs(shape=(4096, 192))
    xs = x[:, ::2]  # [4096, 96] strided
    w2 = torch.randn(256, 96)  # no gradient wanted for w
    y = linear(xs, w2, b)
    assert count_fast
    torch.testing.assert_close(y, F.linear(xs, w2, b), rtol=1e-6, atol=1e-5)
    dx, db = torch.autograd.grad(y.sum(), [x, b])
    ex, eb = torch.autograd.grad(F.linear(xs, w2, b).sum(), [x, b])
    torch.testing.assert_close(dx, ex, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db, eb, rtol=1e-5, atol=1e-2)


@needs_onednn
def test_double_backward_and_forward_ad_equal_f_linear(count_fast):
    import torch.autograd.forward_ad as fwAD

    x, w, b = _inputs()

    def second_order(fn):
        y = fn(x, w, b)
        gx, gw = torch.autograd.grad(y.square().sum(), [x, w], create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.sum(), [x, w, b])

    for a, e in zip(second_order(linear), second_order(F.linear)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-2)
    tx, tw, tb = (torch.randn_like(t) for t in (x, w, b))
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p.detach(), t) for p, t in ((x, tx), (w, tw), (b, tb))]
        got = fwAD.unpack_dual(linear(*duals)).tangent
        want = fwAD.unpack_dual(F.linear(*duals)).tangent
    assert count_fast
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("case", ["small", "float64", "autocast"])
def test_falls_back_to_f_linear_bit_for_bit(case, count_fast):
    if case == "small":
        x, w, b = _inputs(shape=(64, 32), out=10)
    else:
        x, w, b = _inputs(dtype=torch.float64 if case == "float64" else torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        y, y_ref = linear(x, w, b), F.linear(x, w, b)
    assert not count_fast
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)


def test_module_is_nn_linear():
    torch.manual_seed(5)
    ours = Linear(96, 256)
    torch.manual_seed(5)
    stock = torch.nn.Linear(96, 256)
    assert isinstance(ours, torch.nn.Linear)
    for (k, a), (k2, e) in zip(ours.state_dict().items(), stock.state_dict().items()):
        assert k == k2 and torch.equal(a, e)


@needs_onednn
def test_compile_fullgraph_uses_f_linear():
    """Under torch.compile the layer is F.linear (inductor fuses linears itself): fresh process."""
    code = textwrap.dedent("""
        import torch
        from ffkern.train.cpu_linear import Linear
        torch.manual_seed(0)
        m = Linear(96, 256)
        x = torch.randn(4096, 96, requires_grad=True)
        y = torch.compile(m, fullgraph=True)(x)
        y.sum().backward()
        ref = torch.nn.functional.linear(x, m.weight, m.bias)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_shape_errors_are_f_linear_s(count_fast):
    x = torch.randn(4096, 96)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        linear(x, torch.randn(256, 95), torch.randn(256))
    assert not count_fast
