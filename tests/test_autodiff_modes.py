"""Autodiff modes and torch.compile, one suite over the backends (ffkern._op_autograd).

The compiled backends ("cpp", "triton") implement first-order reverse mode. Double backward,
forward mode (jvp, forward_ad) and torch.func.grad must raise naming ffkern, the backend and the
public function, never return a wrong or zero derivative; vmap works (PyTorch's per-sample
fallback) and must match a loop. The reference supports every mode (test_reference_autodiff.py).
torch.compile(fullgraph=True) traces every backend, also when the compiled call is the first use
of the backend in the process (tested in a fresh interpreter), forward and backward.
"""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import ffkern
from conftest import backend_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILED = [c for c in backend_cases() if c.values[0] != "reference"]


def close(actual, expected, tol, what):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    err = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol * scale:.3g}"


def ad_case(function, device):
    """(f(t, backend), t): the public function of one differentiable input, in float64."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 2, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 2, 2], device=device)
    h = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64)
    other = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64).to(device)
    cases = {
        "marginal_supcon_loss": (lambda t, b: ffkern.marginal_supcon_loss(t, y, margin=0.4, backend=b), x),
        "ff_goodness": (lambda t, b: ffkern.ff_goodness(t, skip_tokens=1, backend=b), h),
        "ff_loss": (lambda t, b: ffkern.ff_loss(t, other, threshold=1.0, skip_tokens=1, backend=b), h),
        "symba_loss": (lambda t, b: ffkern.symba_loss(other, t, alpha=2.0, backend=b), h),
        "sffa_loss": (lambda t, b: ffkern.sffa_loss(t, other, kind="sum", backend=b), h),
    }
    f, t = cases[function]
    return f, t.to(device)


AD_FUNCTIONS = ["marginal_supcon_loss", "ff_goodness", "ff_loss", "symba_loss", "sffa_loss"]


@pytest.mark.parametrize("function", AD_FUNCTIONS)
@pytest.mark.parametrize("backend,device", COMPILED)
def test_double_backward_raises(backend, device, function):
    f, t = ad_case(function, device)
    t = t.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not torch's generic "autograd kernel was not registered" warning
        (g,) = torch.autograd.grad(f(t, backend).sum(), t, create_graph=True)
    # the first-order gradient is right, and usable as a value
    close(g, torch.autograd.grad(f(t.cpu(), "reference").sum(), t)[0], 1e-10, "gradient under create_graph=True")
    with pytest.raises(RuntimeError, match=rf"ffkern: backend '{backend}' does not support double backward "
                                           rf"\(create_graph=True\) of {function} .*use backend='reference'"):
        g.square().sum().backward()


@pytest.mark.parametrize("mode", ["torch.func.jvp", "forward_ad"])
@pytest.mark.parametrize("function", AD_FUNCTIONS)
@pytest.mark.parametrize("backend,device", COMPILED)
def test_forward_mode_raises(backend, device, function, mode):
    import torch.autograd.forward_ad as fwAD

    f, t = ad_case(function, device)
    v = torch.ones_like(t)
    with pytest.raises(RuntimeError, match=rf"ffkern: backend '{backend}' does not support forward-mode AD .* of "
                                           rf"{function} .*use backend='reference'"):
        if mode == "forward_ad":
            with fwAD.dual_level():
                f(fwAD.make_dual(t, v), backend)
        else:
            torch.func.jvp(lambda u: f(u, backend), (t,), (v,))


@pytest.mark.parametrize("backend,device", COMPILED)
def test_forward_mode_of_an_unrelated_input_is_not_refused(backend, device):
    """The loss does not depend on the variable carrying the tangent: its (zero) share is right."""
    f, t = ad_case("marginal_supcon_loss", device)
    scale = torch.tensor(2.0, dtype=torch.float64, device=device)
    out, tangent = torch.func.jvp(lambda s: s * f(t, backend), (scale,), (torch.ones_like(scale),))
    close(tangent, f(t.cpu(), "reference"), 1e-10, "tangent")


@pytest.mark.parametrize("function", AD_FUNCTIONS)
@pytest.mark.parametrize("backend,device", COMPILED)
def test_func_grad_raises(backend, device, function):
    f, t = ad_case(function, device)
    with pytest.raises(RuntimeError, match=rf"ffkern: backend '{backend}' does not support torch.func.grad.* of "
                                           rf"{function} .*torch.autograd.grad"):
        torch.func.grad(lambda u: f(u, backend).sum())(t)


@pytest.mark.parametrize("function", AD_FUNCTIONS)
@pytest.mark.parametrize("backend,device", COMPILED)
def test_vmap_matches_a_loop(backend, device, function):
    f, t = ad_case(function, device)
    batch = torch.stack([t, 0.5 * t + 0.25, -t])
    close(torch.func.vmap(lambda u: f(u, backend))(batch), torch.stack([f(u.cpu(), "reference") for u in batch]),
          1e-10, "vmap of the loss")
    # backward (outside the transform) through the vmapped loss
    leaf = batch.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(torch.func.vmap(lambda u: f(u, backend))(leaf).sum(), leaf)
    ref_leaf = batch.detach().cpu().requires_grad_(True)
    (expected,) = torch.autograd.grad(sum(f(u, "reference").sum() for u in ref_leaf.unbind(0)), ref_leaf)
    close(got, expected, 1e-10, "gradient through vmap")


# ---- torch.compile(fullgraph=True) --------------------------------------------------------------------

COMPILE_STEP = """
import sys, torch, ffkern
backend, device = sys.argv[1], sys.argv[2]

def step(x, labels, hp, hn):
    return (ffkern.marginal_supcon_loss(x, labels, margin=0.4, backend=backend)
            + ffkern.ff_loss(hp, hn, backend=backend) + ffkern.symba_loss(hp, hn, backend=backend)
            + ffkern.sffa_loss(hp, hn, backend=backend) + ffkern.ff_goodness(hp, skip_tokens=1, backend=backend).sum())

gen = torch.Generator().manual_seed(6)
x = torch.randn(16, 2, 8, generator=gen).to(device).requires_grad_()
labels = torch.randint(0, 4, (16,), generator=gen).to(device)
hp = torch.randn(6, 3, 10, generator=gen).to(device).requires_grad_()
hn = torch.randn(6, 3, 10, generator=gen).to(device).requires_grad_()
compiled = torch.compile(step, fullgraph=True)  # the first call of any backend is inside the trace
loss = compiled(x, labels, hp, hn)
grads = torch.autograd.grad(loss, (x, hp, hn))
eager = step(x, labels, hp, hn)
eager_grads = torch.autograd.grad(eager, (x, hp, hn))
err = max([(loss - eager).abs().item()] + [(g - e).abs().max().item() for g, e in zip(grads, eager_grads)])
scale = max([eager.abs().item()] + [e.abs().max().item() for e in eager_grads])
assert err <= 1e-5 * scale, f"compiled and eager differ by {err:.3g}"
print("compiled", loss.item())
"""


@pytest.mark.parametrize("backend,device", backend_cases())
def test_compile_fullgraph_as_first_use(backend, device):
    """Cold: a fresh process whose first ffkern call is inside torch.compile(fullgraph=True)
    (the backend is imported, and "cpp" loaded from its cache, while Dynamo traces)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE_STEP), backend, device],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, f"torch.compile(fullgraph=True) failed cold on {backend}:\n{run.stderr[-4000:]}"
    assert "compiled" in run.stdout


def test_compile_fullgraph_auto_is_cold_safe():
    """backend="auto" resolves at trace time to the backend eager would use."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE_STEP), "auto", "cpu"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, f"torch.compile(fullgraph=True) failed cold on auto:\n{run.stderr[-4000:]}"
