"""Backend "cpp" (the compiled extension in csrc/): the torch.ops.ffkern.* operators directly.

opcheck of every operator, float64 gradcheck of the CPU kernels, the two SupCon primitives against
ffkern.reference (anchors as a slice of all rows, row_offset != 0, odd N and D, tiles crossed),
bitwise determinism, operator-level argument errors, and the build-failure path ("auto" warns
once and falls back, backend="cpp" raises with the message; interrupted builds: test_cpp_build.py).
The shared suites run the public API on this backend too: test_conformance.py (values and
gradients) and test_autodiff_modes.py (double backward, forward mode, torch.func, vmap, compile).

The extension is built once per test session (cached across sessions in torch's extension
directory). A build failure fails these tests; they are skipped only where no C++ compiler or no
ninja exists at all, with that reason shown.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import ffkern
from ffkern import _backend, reference
from ffkern._backend import BackendUnavailable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TOOLS = shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None
HAVE_AOT = importlib.util.find_spec("ffkern._C") is not None
needs_tools = pytest.mark.skipif(not (HAVE_TOOLS or HAVE_AOT),
                                 reason="no C++ compiler or no ninja here: the extension cannot be built")
pytestmark = needs_tools
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


@pytest.fixture(scope="module")
def ops():
    from ffkern.cpp import build

    why = build.load_error()
    assert why is None, f"the C++ extension did not build:\n{why}"
    return torch.ops.ffkern


def rows(n, d, dtype=torch.float64, classes=4, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    y = torch.randint(0, classes, (n,), generator=gen)
    return z.to(dtype).to(device), y.to(device)


def close(actual, expected, tol, what):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), f"{what}: non-finite entries differ"
    err = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol * scale:.3g}"


# ---- opcheck ---------------------------------------------------------------------------------------


def op_samples(device):
    """(op name, args) covering every operator, with inputs that require grad where it has autograd."""
    z, y = rows(10, 5, device=device)
    lse = reference.supcon_forward(z.cpu(), y.cpu(), z.cpu(), y.cpu(), 0, 0.2, 0.4)[1].to(device)
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.rand(10, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    h3 = torch.randn(3, 4, 6, generator=gen).to(device)
    h2p, h2n = torch.randn(3, 4, generator=gen).to(device), torch.randn(3, 4, generator=gen).to(device)
    return [
        ("supcon_forward", (z[3:7], y[3:7], z, y, 3, 0.2, 0.4)),
        ("supcon_backward", (z[3:7], y[3:7], z, y, 3, lse[3:7], a[3:7], b[3:7], lse, a, b, 0.2, 0.4)),
        ("supcon_rows", (z.clone().requires_grad_(), y, 0.2, 0.4, None)),
        ("supcon_rows", (z.float().requires_grad_(), y, 0.2, 0.4, torch.bfloat16)),
        ("goodness", (h3.clone().requires_grad_(), "mean", 1)),
        ("goodness_fused", (h3.clone().requires_grad_(), "mean", 1)),
        ("goodness_fused", (h2p.clone().requires_grad_(), "sum", 0)),  # one token: no means
        ("goodness_backward", (torch.randn(3, generator=gen).to(device), h3, "sum", 1)),
        ("goodness_backward", (torch.randn(3, generator=gen).to(device), h3, "sum", 1, h3[:, 1:].mean(1))),
        ("pair_loss", (h2p.clone().requires_grad_(), h2n.clone().requires_grad_(), "sffa", 0.0, "mean", 0)),
        ("pair_loss", (h3.clone().requires_grad_(), h3.flip(0).clone().requires_grad_(), "ff", 1.5, "sum", 1)),
        ("pair_loss", (h3.clone().requires_grad_(), h3.flip(0).clone().requires_grad_(), "sffa", 0.0, "mean", 1,
                       True)),
        ("pair_loss_fused", (h2p.clone().requires_grad_(), h2n.clone().requires_grad_(), "sffa", 0.0, "mean", 0,
                             True)),
        ("pair_loss_fused", (h3.clone().requires_grad_(), h3.flip(0).clone().requires_grad_(), "symba", 4.0, "sum",
                             1, False)),
        ("pair_loss_backward", (torch.tensor(1.5, device=device), h2p, h2n, "symba", 4.0, "mean", 0)),
        ("pair_loss_backward", (torch.tensor(1.5, device=device), h3, h3.flip(0), "sffa", 0.0, "mean", 1,
                                torch.tensor([0.7, 1.3], device=device))),
        ("pair_loss_backward", (torch.tensor(1.5, device=device), h3, h3.flip(0), "ff", 1.0, "mean", 2, None,
                                h3[:, 2:].mean(1), h3.flip(0)[:, 2:].mean(1))),
        # with pair_loss_fused's per-sample energies (E0+, E1+, E0-, E1-) (the CUDA kernels form them)
        ("pair_loss_backward", (torch.tensor(1.5, device=device), h2p, h2n, "ff", 1.0, "mean", 0, None, None, None,
                                torch.stack([h[:, s].square().sum(1) for h in (h2p, h2n)
                                             for s in (slice(0, 2), slice(2, 4))], 1).contiguous())),
    ]


@pytest.mark.parametrize("index", range(len(op_samples("cpu"))))
def test_opcheck_cpu(ops, index):
    name, args = op_samples("cpu")[index]
    torch.library.opcheck(getattr(ops, name).default, args)


def test_every_operator_is_opchecked(ops):
    schemas = {name for name in dir(ops) if not name.startswith("_") and hasattr(getattr(ops, name), "default")}
    assert schemas == {name for name, _ in op_samples("cpu")}


@cuda_only
@pytest.mark.parametrize("index", range(len(op_samples("cpu"))))
def test_opcheck_cuda(ops, index):
    name, args = op_samples("cuda")[index]
    torch.library.opcheck(getattr(ops, name).default, args)


# ---- the SupCon primitives against the reference ---------------------------------------------------

# (n_all, dim, row_offset, anchors, margin, classes): anchors rows row_offset.. of all n_all rows.
# 1300 columns cross the 1024-column tile (online logsumexp across tiles, the self pair in the second
# tile); 300 anchors cross the 256-row block.
PRIMITIVE_CASES = [
    (37, 13, 5, 11, 0.4, 4),
    (37, 13, 0, 37, 0.0, 4),
    (64, 7, 63, 1, 2.0, 2),
    (129, 33, 20, 60, 0.4, 1),  # all labels equal: every pair positive
    (91, 9, 40, 51, 2.0, 1000),  # (almost) no positives
    (1300, 17, 517, 300, 0.4, 5),
    (1, 5, 0, 1, 0.0, 3),  # a single row: no pair at all
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", PRIMITIVE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_primitives_match_reference(ops, highest_precision, case, dtype):
    n_all, dim, off, n, margin, classes = case
    zc, yc = rows(n_all, dim, dtype, classes, seed=n_all + dim)
    zr, yr = zc[off:off + n], yc[off:off + n]
    tau, tol = 0.15, (1e-12 if dtype == torch.float64 else 2e-5)
    expected = reference.supcon_forward(zr, yr, zc, yc, off, tau, margin)
    got = ops.supcon_forward(zr, yr, zc, yc, off, tau, margin)
    for name, e, g in zip(("L", "lse", "|P|", "clipped"), expected, got):
        assert g.dtype == e.dtype, f"{name}: dtype {g.dtype}, expected {e.dtype}"
        close(g, e, tol, name)
    # backward with arbitrary coefficients, the statistics of all rows
    lse_c = reference.supcon_forward(zc, yc, zc, yc, 0, tau, margin)[1]
    gen = torch.Generator().manual_seed(7)
    a_c = torch.rand(n_all, generator=gen, dtype=torch.float64).to(dtype)
    b_c = torch.rand(n_all, generator=gen, dtype=torch.float64).to(dtype)
    args = (zr, yr, zc, yc, off, lse_c[off:off + n], a_c[off:off + n], b_c[off:off + n], lse_c, a_c, b_c, tau, margin)
    close(ops.supcon_backward(*args), reference.supcon_backward(*args), tol, "dz")


def test_labels_beyond_int32(ops):
    """The CPU kernels compare labels as int32: wider values are remapped, equality kept."""
    z, y = rows(50, 6)
    wide = y * (2**40) - 2**35  # distinct classes stay distinct, equal ones equal
    for got, expected in zip(ops.supcon_forward(z, wide, z, wide, 0, 0.2, 0.4), ops.supcon_forward(z, y, z, y, 0, 0.2, 0.4)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("operand", [torch.bfloat16, torch.float16], ids=str)
def test_half_operands_round_z_first(ops, highest_precision, operand):
    """operand_dtype rounds z to 16 bits before the products (as a kernel reading half features)."""
    z, y = rows(40, 24, torch.float32)
    loss, lse, num_pos, _ = ops.supcon_rows(z, y, 0.15, 0.4, operand)
    zq = z.to(operand).float()
    ref_loss, ref_lse, ref_pos, _ = reference.supcon_forward(zq, y, zq, y, 0, 0.15, 0.4)
    close(loss, ref_loss, 2e-5, "L")
    close(lse, ref_lse, 2e-5, "lse")
    assert torch.equal(num_pos, ref_pos)


# ---- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.0, 0.4, 2.0])
def test_gradcheck_supcon_rows_both_outputs(ops, margin):
    """float64 gradcheck of the registered autograd of supcon_rows, through L and through lse."""
    z, y = rows(9, 4, classes=3, seed=3)
    z.requires_grad_(True)
    torch.autograd.gradcheck(lambda t: ops.supcon_rows(t, y, 0.3, margin, None)[0], (z,))
    torch.autograd.gradcheck(lambda t: ops.supcon_rows(t, y, 0.3, margin, None)[1], (z,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_public_supcon(ops, reduction):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 2, 1, 3, 0])  # sample 5 (label 3) has only its other view
    torch.autograd.gradcheck(
        lambda t: ffkern.marginal_supcon_loss(t, y, margin=0.4, reduction=reduction, backend="cpp"), (x,))


@pytest.mark.parametrize("shape,skip", [((5, 6), 0), ((4, 3, 6), 1)], ids=["BD", "BTD-skip1"])
def test_gradcheck_ff_losses(ops, shape, skip):
    gen = torch.Generator().manual_seed(5)
    hp = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    hn = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    for kind in ("mean", "sum"):
        torch.autograd.gradcheck(lambda h: ffkern.ff_goodness(h, kind=kind, skip_tokens=skip, backend="cpp"), (hp,))
        torch.autograd.gradcheck(
            lambda a, b: ffkern.ff_loss(a, b, threshold=1.0, kind=kind, skip_tokens=skip, backend="cpp"), (hp, hn))
        torch.autograd.gradcheck(
            lambda a, b: ffkern.symba_loss(a, b, alpha=2.0, kind=kind, skip_tokens=skip, backend="cpp"), (hp, hn))
        torch.autograd.gradcheck(
            lambda a, b: ffkern.sffa_loss(a, b, kind=kind, skip_tokens=skip, backend="cpp"), (hp, hn))


# ---- the token means saved by the forward for the backward (issue 14) ----------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,skip", [((5, 6), 0), ((4, 3, 6), 1), ((4, 3, 6), 0), ((4, 3, 6), 2), ((3, 1, 8), 0)],
                         ids=["BD", "BTD-skip1", "BTD", "BTD-one-kept", "BT1D"])
def test_forward_returns_the_token_means(ops, shape, skip, dtype):
    """goodness_fused / pair_loss_fused return the token means [B, D] (accumulation type) where a
    sample keeps more than one token, an empty tensor where its mean is one row of h."""
    gen = torch.Generator().manual_seed(14)
    hp, hn = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    kept = (shape[1] if len(shape) == 3 else 1) - skip
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = hp.to(acc)[:, skip:].mean(1) if kept > 1 else hp.new_empty(0, dtype=acc)
    g, mean = ops.goodness_fused(hp, "mean", skip)
    assert mean.dtype == acc and mean.shape == expected.shape
    close(mean, expected, 1e-12 if dtype == torch.float64 else 1e-6, "token means")
    assert torch.equal(g, ops.goodness(hp, "mean", skip))
    loss, activity, mean_p, mean_n, _ = ops.pair_loss_fused(hp, hn, "symba", 4.0, "mean", skip, False)
    assert activity.numel() == 0 and torch.equal(mean_p, mean) and mean_n.shape == expected.shape
    assert torch.equal(loss, ops.pair_loss(hp, hn, "symba", 4.0, "mean", skip))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_backward_from_saved_means_does_not_read_h(ops, dtype):
    """With the means given, the backward ops read them and never h: an h of NaNs (same shape) gives
    the gradients of the real h; the means computed from h (none given) give them too."""
    gen = torch.Generator().manual_seed(15)
    hp, hn = (torch.randn(4, 5, 8, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    nan = torch.full_like(hp, float("nan"))
    grad_b = torch.randn(4, generator=gen, dtype=torch.float64).to(torch.float64 if dtype == torch.float64 else torch.float32)
    _, mean = ops.goodness_fused(hp, "sum", 1)
    expected = ops.goodness_backward(grad_b, hp, "sum", 1)
    assert torch.equal(ops.goodness_backward(grad_b, nan, "sum", 1, mean), expected)
    loss, activity, mp, mn, _ = ops.pair_loss_fused(hp, hn, "sffa", 0.0, "mean", 1, True)
    grad = torch.tensor(0.75, dtype=mean.dtype)
    expected = ops.pair_loss_backward(grad, hp, hn, "sffa", 0.0, "mean", 1, activity)
    got = ops.pair_loss_backward(grad, nan, nan, "sffa", 0.0, "mean", 1, activity, mp, mn)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and not g[:, 0].any()
        close(g, e, 1e-12 if dtype == torch.float64 else 1e-6, "dh from the means")
    with pytest.raises(RuntimeError, match=r"mean_neg must be \[B, D\]"):
        ops.pair_loss_backward(grad, hp, hn, "sffa", 0.0, "mean", 1, activity, mp, mn[:2])
    with pytest.raises(RuntimeError, match="mean must be"):
        ops.goodness_backward(grad_b, hp, "sum", 1, mean.to(torch.float16))


def test_large_float32_backward_from_means_matches_reference(ops, highest_precision):
    """The streamed-store path (gradients of 8 MiB and more) from the saved means, rows unaligned."""
    gen = torch.Generator().manual_seed(16)
    hp, hn = (torch.randn(120, 9, 1002, generator=gen).requires_grad_() for _ in range(2))
    ref = [t.detach().double().requires_grad_() for t in (hp, hn)]
    for case in ("goodness", "ff"):
        if case == "goodness":
            expected = (reference.goodness(ref[0], "mean", 1) * torch.arange(120.0).double()).sum()
            got = (ffkern.ff_goodness(hp, skip_tokens=1, backend="cpp") * torch.arange(120.0)).sum()
        else:
            expected = reference.ff_loss(*ref, 1.0, "mean", 1)
            got = ffkern.ff_loss(hp, hn, threshold=1.0, skip_tokens=1, backend="cpp")
        expected.backward()
        got.backward()
        for t, r in zip((hp, hn), ref):
            if r.grad is not None:
                close(t.grad, r.grad, 1e-5, f"{case} dh")
                assert not t.grad[:, 0].any()
            t.grad, r.grad = None, None


# ---- SFFA's activity term, fused into the kernels (SPEC 2) ----------------------------------------


def test_sffa_activity_is_fused(ops, monkeypatch):
    """backend "cpp" computes A inside the kernels: the PyTorch composition is never called."""
    def composed(*args, **kwargs):
        raise AssertionError("the cpp backend composed SFFA's activity term in PyTorch")

    monkeypatch.setattr(reference, "sffa_activity", composed)
    gen = torch.Generator().manual_seed(2)
    hp, hn = (torch.rand(6, 3, 8, generator=gen).requires_grad_() for _ in range(2))
    loss = ffkern.sffa_loss(hp, hn, skip_tokens=1, activity_term=True, backend="cpp")
    loss.backward()
    plain = ffkern.sffa_loss(hp.detach(), hn.detach(), skip_tokens=1, backend="cpp")
    mu = hp.detach()[:, 1:].mean() + hn.detach()[:, 1:].mean()
    torch.testing.assert_close(loss.detach(), plain * (1 + torch.exp(-10 * mu)))
    assert hp.grad is not None and not hp.grad[:, 0].any()


def test_sffa_activity_outputs(ops):
    """pair_loss_fused: (L_S A, (L_S, A), ...) with the term, (L_S, empty, ...) without it."""
    gen = torch.Generator().manual_seed(3)
    hp, hn = (torch.rand(5, 4, 6, generator=gen, dtype=torch.float64) * 0.3 for _ in range(2))
    loss, activity, _, _, _ = ops.pair_loss_fused(hp, hn, "sffa", 0.0, "mean", 1, True)
    plain, none, _, _, _ = ops.pair_loss_fused(hp, hn, "sffa", 0.0, "mean", 1, False)
    assert none.numel() == 0 and activity.shape == (2,)
    a = reference.sffa_activity(hp, hn, 1)
    close(activity, torch.stack([plain, a]), 1e-12, "(L_S, A)")
    close(loss, plain * a, 1e-12, "L")
    with pytest.raises(RuntimeError, match="activity_term is SFFA's factor"):
        ops.pair_loss_fused(hp, hn, "ff", 2.0, "mean", 1, True)
    with pytest.raises(RuntimeError, match="activity must hold"):
        ops.pair_loss_backward(torch.tensor(1.0), hp, hn, "sffa", 0.0, "mean", 1, torch.ones(3))


@pytest.mark.parametrize("shape,skip", [((5, 6), 0), ((4, 3, 6), 1), ((3, 1, 8), 0)], ids=["BD", "BTD-skip1", "BT1D"])
def test_gradcheck_sffa_activity(ops, shape, skip):
    """float64 gradcheck of the fused activity path: A dL_S/dh + L_S dA/dh (0 on skipped tokens)."""
    gen = torch.Generator().manual_seed(9)
    hp = (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
    hn = (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.3 - 0.05).requires_grad_()
    for kind in ("mean", "sum"):
        torch.autograd.gradcheck(
            lambda a, b: ffkern.sffa_loss(a, b, kind=kind, skip_tokens=skip, activity_term=True, backend="cpp"),
            (hp, hn))


def test_sffa_activity_modes(ops):
    """The fused op under torch.compile(fullgraph=True) matches eager; double backward and forward
    mode raise naming ffkern (ffkern._op_autograd), as for the plain loss."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(4)
    hp, hn = (torch.rand(4, 3, 6, generator=gen, dtype=torch.float64) * 0.3 for _ in range(2))
    fn = lambda a, b: ffkern.sffa_loss(a, b, skip_tokens=1, activity_term=True, backend="cpp")  # noqa: E731
    eager = [t.clone().requires_grad_() for t in (hp, hn)]
    fn(*eager).backward()
    compiled = [t.clone().requires_grad_() for t in (hp, hn)]
    torch._dynamo.reset()
    value = torch.compile(fn, fullgraph=True)(*compiled)
    value.backward()
    close(value, fn(hp, hn), 1e-12, "compiled L")
    for c, e in zip(compiled, eager):
        close(c.grad, e.grad, 1e-12, "compiled dh")
    t = hp.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(t, hn), t, create_graph=True)
    with pytest.raises(RuntimeError, match="ffkern: backend 'cpp' does not support double backward .* sffa_loss"):
        g.sum().backward()
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="ffkern: backend 'cpp' does not support forward-mode AD"):
            fn(fwAD.make_dual(hp, torch.ones_like(hp)), hn)


def test_sffa_activity_large_float32_matches_reference(ops, highest_precision):
    """The streamed-store path (gradients of 8 MiB and more) with the activity constant."""
    gen = torch.Generator().manual_seed(10)
    hp, hn = ((torch.rand(130, 9, 1002, generator=gen) * 0.3).requires_grad_() for _ in range(2))  # rows of 4008 bytes: unaligned
    ref = [t.detach().double().requires_grad_() for t in (hp, hn)]
    expected = reference.sffa_loss(*ref, skip_tokens=2, activity_term=True)
    got = ffkern.sffa_loss(hp, hn, skip_tokens=2, activity_term=True, backend="cpp")
    close(got, expected, 1e-5, "L")
    expected.backward()
    got.backward()
    for g, r in zip((hp.grad, hn.grad), ref):
        close(g, r.grad, 1e-5, "dh")
        assert not g[:, :2].any()


# ---- determinism --------------------------------------------------------------------------------


def test_bitwise_deterministic(ops):
    z, y = rows(700, 48, torch.float32, classes=6, seed=8)  # several row blocks on both threads

    def run():
        zz = z.clone().requires_grad_(True)
        loss, lse, _, _ = ops.supcon_rows(zz, y, 0.15, 0.4, None)
        (loss.sum() + 0.5 * lse.sum()).backward()
        hp = z[:, :40].reshape(70, 10, 40).clone().requires_grad_(True)
        ff = ffkern.symba_loss(hp, hp.flip(0), skip_tokens=2, backend="cpp")
        ff.backward()
        return loss, lse, zz.grad, ff, hp.grad

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


THREADS_RUN = """
import sys, torch, ffkern
torch.set_num_threads(int(sys.argv[1]))
gen = torch.Generator().manual_seed(0)
x = torch.randn(1100, 128, generator=gen).requires_grad_()  # two column tiles, five row blocks
y = torch.randint(0, 10, (1100,), generator=gen)
loss = ffkern.marginal_supcon_loss(x, y, margin=0.3, reduction="none", backend="cpp")
loss.sum().backward()
torch.save((loss.detach(), x.grad), sys.argv[2])
"""


def _mkl_strict_branch() -> str:
    """MKL's conditional numerical reproducibility branch for this CPU, strict mode (the README's
    advice for results that do not depend on the thread count)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "AVX512,STRICT", "AVX2": "AVX2,STRICT"}.get(capability, "COMPATIBLE")


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch is built without MKL")
def test_thread_count_reproducibility_is_as_documented(ops, tmp_path):
    """README, Guarantees and limits: bitwise run to run at a fixed thread count (above); across
    thread counts, MKL's GEMM partitions its sums by thread count, so results agree to rounding
    (measured: 1 and 2 threads differ by ~1e-8 at N >= 1100), and bitwise with MKL_CBWR set to a
    strict branch (its cost measured as nil on the 2-core Xeon: 0.31 s both ways, N=8192)."""
    results = {}
    for mode, env in (("default", {}), ("strict", {"MKL_CBWR": _mkl_strict_branch()})):
        for threads in (1, 2):
            out = tmp_path / f"{mode}-{threads}.pt"
            run = subprocess.run([sys.executable, "-c", THREADS_RUN, str(threads), str(out)], capture_output=True,
                                 text=True, cwd=REPO, env={**os.environ, **env}, timeout=600)
            assert run.returncode == 0, run.stderr
            results[mode, threads] = torch.load(out)
    for one, two in zip(results["strict", 1], results["strict", 2]):
        assert torch.equal(one, two), "MKL_CBWR strict: 1 and 2 threads must give the same bits"
    for one, two in zip(results["default", 1], results["default", 2]):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-7)


# ---- operator-level errors -------------------------------------------------------------------------


def test_operator_argument_errors(ops):
    z, y = rows(10, 4)
    with pytest.raises(RuntimeError, match="row_offset"):
        ops.supcon_forward(z[:5], y[:5], z, y, 6, 0.2, 0.0)
    with pytest.raises(RuntimeError, match="feature dimension"):
        ops.supcon_forward(z[:, :3], y, z, y, 0, 0.2, 0.0)
    with pytest.raises(RuntimeError, match="integer dtype"):
        ops.supcon_forward(z, y.double(), z, y, 0, 0.2, 0.0)
    with pytest.raises(RuntimeError, match="temperature"):
        ops.supcon_forward(z, y, z, y, 0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="lse_c"):
        ops.supcon_backward(z, y, z, y, 0, z[:, 0], z[:, 0], z[:, 0], z[:5, 0], z[:, 0], z[:, 0], 0.2, 0.0)
    with pytest.raises(RuntimeError, match="D must be even"):
        ops.pair_loss(torch.randn(2, 5), torch.randn(2, 5), "sffa", 0.0, "mean", 0)
    with pytest.raises(RuntimeError, match="loss must be"):
        ops.pair_loss(torch.randn(2, 4), torch.randn(2, 4), "hinge", 0.0, "mean", 0)
    with pytest.raises(RuntimeError, match="skip_tokens"):
        ops.goodness(torch.randn(2, 3, 4), "mean", 3)


# ---- building: never on import; a failed build --------------------------------------------------------


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **env}, timeout=300)


def test_import_never_builds():
    out = run_python("""
        import sys, ffkern, ffkern.cpp
        from ffkern.cpp import build
        assert not build.STATE.loaded and not build.STATE.origin, "importing ffkern loaded the extension"
        assert "torch.utils.cpp_extension" not in sys.modules, "importing ffkern imported the builder"
        print("ok")
    """)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_build_failure_simulated(monkeypatch):
    """A build that raises: "auto" warns once in one line and falls back, "cpp" raises with the message."""
    from ffkern.cpp import build

    def failing_build():
        raise RuntimeError("Error building extension 'ffkern_cpu_x':\nc++: fatal error: simulated compiler failure")

    monkeypatch.setattr(build, "STATE", build._State())
    monkeypatch.setattr(build, "_load_aot", lambda: None)
    monkeypatch.setattr(build, "_build_jit", failing_build)
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("FFKERN_BACKEND", raising=False)
    x, y = torch.randn(6, 2, 4), torch.arange(6)
    with pytest.warns(RuntimeWarning, match="backend 'cpp' unavailable") as record:
        loss = ffkern.marginal_supcon_loss(x, y)  # auto
    assert len(record) == 1 and "\n" not in str(record[0].message)
    torch.testing.assert_close(loss, ffkern.marginal_supcon_loss(x, y, backend="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second "auto" call is silent
        ffkern.ff_loss(x[:, 0], x[:, 1])
    with pytest.raises(BackendUnavailable, match="simulated compiler failure"):
        ffkern.marginal_supcon_loss(x, y, backend="cpp")
    with pytest.raises(BackendUnavailable, match="could not be built"):
        ffkern.ff_goodness(x[:, 0], backend="cpp")


@pytest.mark.skipif(HAVE_AOT, reason="an ahead-of-time build (ffkern._C) is installed: it would load instead")
def test_build_failure_real_compiler(tmp_path):
    """An actual JIT build with a compiler that does not exist, in a fresh extension directory."""
    out = run_python("""
        import warnings, torch, ffkern
        x, y = torch.randn(6, 2, 4), torch.arange(6)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ffkern.marginal_supcon_loss(x, y)
        print("WARN", [str(m.message) for m in w])
        try:
            ffkern.marginal_supcon_loss(x, y, backend="cpp")
        except ffkern.BackendUnavailable as exc:
            print("RAISED", exc)
    """, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), FFKERN_BACKEND="")
    assert out.returncode == 0, out.stderr
    assert "WARN [\"ffkern: backend 'cpp' unavailable" in out.stdout, out.stdout
    assert "RAISED backend 'cpp' cannot run here" in out.stdout and "no-such-c++" in out.stdout, out.stdout


# ---- CUDA (where a GPU exists) -----------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", PRIMITIVE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_primitives_match_reference(ops, highest_precision, case, dtype):
    n_all, dim, off, n, margin, classes = case
    zc, yc = rows(n_all, dim, torch.float64, classes, seed=n_all + dim)
    zc = zc.to(dtype).double()  # the values the kernel sees
    zr, yr = zc[off:off + n], yc[off:off + n]
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}[dtype]
    expected = reference.supcon_forward(zr, yr, zc, yc, off, 0.15, margin)
    dev = lambda t: t.to("cuda", dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    got = ops.supcon_forward(dev(zr), yr.cuda(), dev(zc), yc.cuda(), off, 0.15, margin)
    for name, e, g in zip(("L", "lse", "|P|", "clipped"), expected, got):
        close(g, e, tol, name)
    lse_c = reference.supcon_forward(zc, yc, zc, yc, 0, 0.15, margin)[1]
    a_c = torch.rand(n_all, dtype=torch.float64)
    b_c = torch.rand(n_all, dtype=torch.float64)
    args = (zr, yr, zc, yc, off, lse_c[off:off + n], a_c[off:off + n], b_c[off:off + n], lse_c, a_c, b_c, 0.15, margin)
    stat = (lambda t: t.cuda()) if dtype == torch.float64 else (lambda t: t.float().cuda())  # noqa: E731
    got_dz = ops.supcon_backward(dev(zr), yr.cuda(), dev(zc), yc.cuda(), off, *map(stat, args[5:11]), 0.15, margin)
    close(got_dz, reference.supcon_backward(*args), tol, "dz")
