"""The per-class goodness loss (SPEC 2.2): values against a hand-written formula, float64
gradcheck in both memory layouts, the backends' rule, the module; then the fused backends
("triton", "cpp": every pair of conftest.backend_cases() whose backend has the kernel) against the
reference: values and gradients in h, W, bias and a tensor scale, every reduction, NCHW and
channels-last read in place, float64 gradcheck, bf16 input, K = 2 and 100, 1x1 maps, odd sizes,
torch.compile(fullgraph=True), the refused autodiff modes and opcheck of the operators."""
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
    fn = lambda h, w, b, s: per_class_goodness_loss(h, w, y, bias=b, scale=s, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_backends_rule(monkeypatch):
    h, w, _, y = inputs(dtype=torch.float32)
    from ffkern._backend import resolve

    auto = resolve("auto", h.device)  # the backend the other losses use on this device, where it has the kernel
    auto = auto if hasattr(auto, "per_class_loss") else resolve("reference", h.device)
    got = per_class_goodness_loss(h, w, y, backend="auto")
    assert torch.equal(got, auto.per_class_loss(h, w, y, None, 1.0, "mean"))

    class NoKernel:  # a backend without the per-class kernel
        name = "cpp"

    import ffkern.per_class as per_class

    monkeypatch.setattr(per_class, "resolve", lambda backend, device: resolve(backend, device)
                        if backend == "reference" else NoKernel())
    with pytest.raises(BackendUnavailable, match="no per-class goodness kernel"):
        per_class_goodness_loss(h, w, y, backend="cpp")
    ref = per_class_goodness_loss(h, w, y, backend="reference")
    assert torch.equal(per_class_goodness_loss(h, w, y, backend="auto"), ref)  # auto falls back to the reference
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


# ---- the fused backends against the reference ----------------------------------------------------------

from conftest import backend_cases  # noqa: E402

from ffkern import _backend  # noqa: E402


def _with_kernel(cases):
    """The fused pairs; a backend without the per-class kernel yet is a visible skip."""
    out = []
    for case in cases:
        name, device = case.values
        if name == "reference":
            continue
        marks = list(case.marks)
        if not marks and not hasattr(_backend._instance(name), "per_class_loss"):
            marks = [pytest.mark.skip(reason=f"backend {name!r} has no per-class kernel")]
        out.append(pytest.param(name, device, id=case.id, marks=marks))
    return out


FUSED = _with_kernel(backend_cases())


def close(actual, expected, tol, what):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol * scale:.3g}"


def run(backend, device, h, w, y, bias, scale, reduction, channels_last):
    """(loss, class goodness, grads of h, w, bias, scale) of one backend; h, w, bias, scale leaves."""
    h = h.to(device)
    h = (h.contiguous(memory_format=torch.channels_last) if channels_last else h.contiguous()).requires_grad_(True)
    w = w.to(device).requires_grad_(True)
    bias = bias.to(device).requires_grad_(True) if bias is not None else None
    scale = scale.to(device).requires_grad_(True) if isinstance(scale, torch.Tensor) else scale
    loss = per_class_goodness_loss(h, w, y.to(device), bias=bias, scale=scale, reduction=reduction, backend=backend)
    g = class_goodness(h, w, bias, backend=backend)
    leaves = [t for t in (h, w, bias, scale) if isinstance(t, torch.Tensor)]
    # a weighted sum, so that "none" and the class goodness get a non-uniform incoming gradient
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    gw = torch.linspace(-1.0, 1.0, g.numel(), dtype=g.dtype, device=g.device).reshape(g.shape)
    grads = torch.autograd.grad((loss * weights).sum() + (g * gw).sum(), leaves)
    if channels_last and h.shape[1] > 1 and h.shape[2] * h.shape[3] > 1:
        assert grads[0].is_contiguous(memory_format=torch.channels_last), "dh keeps the channels-last layout"
    return loss, g, grads


# (B, C, K, (H, W), dtype, bias, tensor scale): odd sizes cross the tile edges; K = 100 with C = 80 takes
# the two-pass backward (channels over several tiles), C = 300 the one-tile path with 16 positions.
CASES = [
    (5, 6, 4, (3, 2), torch.float32, True, True),
    (3, 37, 2, (5, 7), torch.float32, False, False),
    (4, 80, 100, (3, 3), torch.float32, True, True),
    (6, 20, 10, (1, 1), torch.float32, True, False),  # P = 1
    (2, 300, 10, (4, 5), torch.float32, False, True),
    (3, 9, 5, (6, 3), torch.float64, True, True),
]


# every case in both layouts with "mean"; "sum" and "none" on two of them
RUNS = [(case, layout, reduction) for case in range(len(CASES)) for layout in ("nchw", "channels_last")
        for reduction in (("mean", "sum", "none") if case in (0, 2) else ("mean",))]


@pytest.mark.parametrize("case,layout,reduction", RUNS)
@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_matches_reference(backend, device, case, layout, reduction, highest_precision):
    b, c, k, hw, dtype, with_bias, tensor_scale = CASES[case]
    h, w, bias, y = inputs(b, c, k, hw, dtype=torch.float64, seed=case)
    h = h.to(dtype)
    w, bias = w.to(dtype), (bias.to(dtype) if with_bias else None)
    scale = torch.tensor(0.9, dtype=dtype) if tensor_scale else 0.6
    cl = layout == "channels_last"
    loss, g, grads = run(backend, device, h, w, y, bias, scale, reduction, cl)
    r_loss, r_g, r_grads = run("reference", "cpu", h.double(), w.double(), y, None if bias is None else bias.double(),
                               scale.double() if tensor_scale else scale, reduction, cl)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert loss.dtype == g.dtype == dtype
    close(loss, r_loss, tol, "loss")
    close(g, r_g, tol, "class goodness")
    for name, got, want in zip(("dh", "dW", "dbias", "dscale"), grads, r_grads):
        assert got.dtype == dtype, name
        close(got, want, tol, name)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_gradcheck_float64(backend, device, layout):
    h, w, bias, y = inputs(b=2, c=3, k=2, hw=(2, 2), seed=3)
    h = h.to(device)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    args = [h.requires_grad_(True)] + [t.to(device).requires_grad_(True) for t in (w, bias, torch.tensor(0.8, dtype=torch.float64))]
    y = y.to(device)
    fn = lambda h, w, b, s: per_class_goodness_loss(h, w, y, bias=b, scale=s, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradcheck(lambda h, w, b: class_goodness(h, w, b, backend=backend), args[:3])


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_bf16_input(backend, device):
    """bf16 h and W are read as they are, accumulated in float32: the loss is float32, the
    gradients bf16 (their inputs' dtype), and all are the reference's on the same bf16 values."""
    h, w, bias, y = inputs(b=4, c=24, k=10, hw=(5, 3), dtype=torch.float32, seed=5)
    h, w = h.to(torch.bfloat16), w.to(torch.bfloat16)
    loss, g, grads = run(backend, device, h, w, y, None, torch.tensor(1.3), "mean", True)
    r_loss, r_g, r_grads = run("reference", "cpu", h, w, y, None, torch.tensor(1.3), "mean", True)
    assert loss.dtype == g.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.bfloat16
    close(loss, r_loss, 1e-5, "loss")
    close(g, r_g, 1e-5, "class goodness")
    for name, got, want in zip(("dh", "dW", "dscale"), grads, r_grads):
        close(got, want, 1e-2, name)  # one bf16 rounding of the gradient apart at most


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_1x1_conv_weight_and_strided_maps(backend, device):
    """A [K, C, 1, 1] weight, and a map whose positions are not one stride apart (a slice: copied)."""
    h, w, bias, y = inputs(b=3, c=5, k=3, hw=(4, 6), seed=7)
    h, w, bias, y = h.to(device), w.to(device), bias.to(device), y.to(device)
    sliced = h[:, :, 1:, 2:]
    want = per_class_goodness_loss(sliced.cpu(), w.cpu(), y.cpu(), bias=bias.cpu(), backend="reference")
    got = per_class_goodness_loss(sliced, w[:, :, None, None], y, bias=bias, backend=backend)
    close(got, want, 1e-12, "loss of a sliced map")


COMPILE_CALL = """
import sys, torch, ffkern
backend, device = sys.argv[1], sys.argv[2]

def step(h, w, bias, scale, labels):
    return (ffkern.per_class_goodness_loss(h, w, labels, bias=bias, scale=scale, backend=backend)
            + ffkern.class_goodness(h, w, bias, backend=backend).square().mean())

gen = torch.Generator().manual_seed(2)
h = torch.randn(4, 6, 3, 5, generator=gen).to(device).contiguous(memory_format=torch.channels_last).requires_grad_()
w = torch.randn(3, 6, generator=gen).to(device).requires_grad_()
bias = torch.randn(3, generator=gen).to(device).requires_grad_()
scale = torch.tensor(0.7, device=device).requires_grad_()
labels = torch.tensor([0, 2, 1, 2], device=device)
compiled = torch.compile(step, fullgraph=True)  # the first call of the backend is inside the trace
loss = compiled(h, w, bias, scale, labels)
grads = torch.autograd.grad(loss, (h, w, bias, scale))
eager = step(h, w, bias, scale, labels)
eager_grads = torch.autograd.grad(eager, (h, w, bias, scale))
err = max([(loss - eager).abs().item()] + [(g - e).abs().max().item() for g, e in zip(grads, eager_grads)])
scale_ = max([eager.abs().item()] + [e.abs().max().item() for e in eager_grads])
assert err <= 1e-5 * scale_, f"compiled and eager differ by {err:.3g}"
print("compiled", loss.item())
"""


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_compile_fullgraph_as_first_use(backend, device):
    import os
    import subprocess
    import sys
    import textwrap

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE_CALL), backend, device], capture_output=True,
                         text=True, env=env, timeout=900)
    assert out.returncode == 0, f"torch.compile(fullgraph=True) failed on {backend}:\n{out.stderr[-4000:]}"
    assert "compiled" in out.stdout


def _ad_case(function, device):
    h, w, bias, y = inputs(b=3, c=4, k=3, hw=(2, 3), seed=9)
    h, w, bias, y = h.to(device), w.to(device), bias.to(device), y.to(device)
    if function == "class_goodness":
        return (lambda t, backend: class_goodness(t, w, bias, backend=backend)), h
    return (lambda t, backend: per_class_goodness_loss(t, w, y, bias=bias, scale=0.5, backend=backend)), h


@pytest.mark.parametrize("function", ["per_class_goodness_loss", "class_goodness"])
@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_double_backward_raises(backend, device, function):
    import warnings

    f, t = _ad_case(function, device)
    t = t.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not torch's generic "autograd kernel was not registered" warning
        (g,) = torch.autograd.grad(f(t, backend).sum(), t, create_graph=True)
    ref = t.detach().cpu().requires_grad_(True)
    close(g, torch.autograd.grad(f(ref, "reference").sum(), ref)[0], 1e-12, "gradient under create_graph=True")
    with pytest.raises(RuntimeError, match=rf"ffkern: backend '{backend}' does not support double backward "
                                           rf"\(create_graph=True\) of .*{function}.*use backend='reference'"):
        g.square().sum().backward()


@pytest.mark.parametrize("mode", ["torch.func.jvp", "forward_ad", "torch.func.grad"])
@pytest.mark.parametrize("function", ["per_class_goodness_loss", "class_goodness"])
@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_other_modes_raise(backend, device, function, mode):
    import torch.autograd.forward_ad as fwAD

    f, t = _ad_case(function, device)
    what = "torch.func.grad" if mode == "torch.func.grad" else "forward-mode AD"
    with pytest.raises(RuntimeError, match=rf"ffkern: backend '{backend}' does not support {what}.* of {function} "
                                           rf".*backend='reference'"):
        if mode == "forward_ad":
            with fwAD.dual_level():
                f(fwAD.make_dual(t, torch.ones_like(t)), backend)
        elif mode == "torch.func.jvp":
            torch.func.jvp(lambda u: f(u, backend), (t,), (torch.ones_like(t),))
        else:
            torch.func.grad(lambda u: f(u, backend).sum())(t)


def _ops_of(backend):
    if backend == "triton":
        return torch.ops.ffkern_triton
    from ffkern.cpp import per_class_ops

    return per_class_ops.OPS


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_opcheck(backend, device):
    _backend._instance(backend)  # registers the operators
    ops = _ops_of(backend)
    h, w, bias, y = inputs(b=3, c=5, k=3, hw=(2, 3), seed=4)
    h, w, bias, y = h.to(device), w.to(device), bias.to(device), y.to(device)
    cl = h.contiguous(memory_format=torch.channels_last)
    scale = torch.tensor(0.7, dtype=torch.float64, device=device)
    coef = torch.randn(3, 3, dtype=torch.float64, device=device)
    samples = [
        (ops.class_goodness, (h.clone().requires_grad_(), w.clone().requires_grad_(), bias.clone().requires_grad_())),
        (ops.class_goodness, (cl.float(), w.float(), None)),
        (ops.per_class_loss, (h.clone().requires_grad_(), w.clone().requires_grad_(), y, bias.clone().requires_grad_(),
                              scale.clone().requires_grad_(), "mean")),
        (ops.per_class_loss, (cl.clone().requires_grad_(), w, y.int(), None, scale, "none")),
        (ops.per_class_loss, (h.float(), w.float(), y, None, scale.float(), "sum")),
        (ops.per_class_backward, (cl, w, bias, coef)),
        (ops.per_class_backward, (h.bfloat16(), w.bfloat16(), None, coef.float())),
    ]
    for op, args in samples:
        torch.library.opcheck(op.default, args)


# ---- the cpp CPU kernel's two ways of computing a tile (csrc/cpu/per_class_cpu.cpp) ------------------

def _cpp_cpu_or_skip():
    try:
        _backend._instance("cpp")
    except Exception as exc:  # noqa: BLE001 - the reason is shown
        pytest.skip(f"backend 'cpp' unavailable: {exc}")


def _cpp_grads(h, w, bias, y, products, monkeypatch):
    monkeypatch.setenv("FFKERN_CPU_PER_CLASS_PRODUCTS", products)
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    loss = per_class_goodness_loss(h, w, y, bias=bias, scale=0.8, reduction="sum", backend="cpp")
    g = class_goodness(h, w, bias, backend="cpp")
    gw = torch.linspace(-1.0, 1.0, g.numel()).reshape(g.shape)
    return (loss, g, *torch.autograd.grad(loss + (g * gw).sum(), (h, w, bias)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 70, 7, (9, 5)), (64, 256, 10, (16, 16))],
                         ids=["odd", "large (dh streamed, several tiles)"])
def test_cpp_cpu_blocked_products_and_loops_agree(shape, layout, dtype, monkeypatch):
    """The blocked products (float32 accumulation: the default) and the plain loops
    (FFKERN_CPU_PER_CLASS_PRODUCTS=loops) compute the same loss and gradients as the reference; the
    large case's float32 dh exceeds 8 MiB, so that it is written with streaming stores, and C = 256
    over 16 x 16 positions spans several position tiles."""
    _cpp_cpu_or_skip()
    b, c, k, hw = shape
    h, w, bias, y = inputs(b, c, k, hw, dtype=torch.float32, seed=11)
    h, w, bias = h.to(dtype), w.to(dtype), bias.to(dtype)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    names = ("loss", "g", "dh", "dW", "dbias")
    blocked = _cpp_grads(h, w, bias, y, "blas", monkeypatch)
    loops = _cpp_grads(h, w, bias, y, "loops", monkeypatch)
    hr, wr, br = (t.double().requires_grad_(True) for t in (h, w, bias))
    r_loss = per_class_goodness_loss(hr, wr, y, bias=br, scale=0.8, reduction="sum", backend="reference")
    r_g = class_goodness(hr, wr, br, backend="reference")
    gw = torch.linspace(-1.0, 1.0, r_g.numel(), dtype=torch.float64).reshape(r_g.shape)
    ref = (r_loss, r_g, *torch.autograd.grad(r_loss + (r_g * gw).sum(), (hr, wr, br)))
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the gradient
    for name, got_b, got_l, want in zip(names, blocked, loops, ref):
        close(got_b, want, tol, f"blocked {name}")
        close(got_l, want, tol, f"loops {name}")
    assert blocked[2].dtype == dtype and blocked[2].is_contiguous(memory_format=(
        torch.channels_last if layout == "channels_last" else torch.contiguous_format))


def test_cpp_cpu_blocked_products_bitwise_reproducible(monkeypatch):
    """The blocked path's gradients are the same bits run to run and with 1 or 2 threads (dW summed
    per fixed chunk of samples, each chunk's products single-threaded in order)."""
    _cpp_cpu_or_skip()
    monkeypatch.delenv("FFKERN_CPU_PER_CLASS_PRODUCTS", raising=False)
    h, w, bias, y = inputs(96, 40, 10, (6, 6), dtype=torch.float32, seed=12)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(_cpp_grads(h, w, bias, y, "blas", monkeypatch))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name, a, b in zip(("loss", "g", "dh", "dW", "dbias"), results[0], other):
            assert torch.equal(a, b), f"{name} differs between runs / thread counts"
