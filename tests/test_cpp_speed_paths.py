"""The speed paths of the cpp CPU kernels (issue 14) are taken where they should be, and are accurate.

  - 16-bit products: bfloat16/float16 features multiply as 16-bit BLAS operands (fp32 tile of s,
    G rounded to 16 bits in the backward, fp16 G scaled by a power of two) where the CPU has units
    for them, as fp32 otherwise; FFKERN_CPU_HALF_PRODUCTS=half|float forces either. Both are
    compared here on any CPU (MKL emulates 16-bit products where there are no such units).
  - one exp per pair in the backward where a tile's lse values are within 40 of each other, two
    otherwise: both against the reference.
No timing here: the speed figures come from benchmarks/cpp_cpu_goals.py.
"""
import pytest
import torch

import ffkern
from ffkern import reference

from test_cpp_ops import close, needs_tools, ops, rows  # noqa: F401  (ops is a fixture)

pytestmark = needs_tools


def _has(*capabilities):
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(caps.get(c) for c in capabilities)


def supcon_fwd_bwd(ops, z, y, operand, tau=0.15, margin=0.4):
    zz = z.clone().requires_grad_(True)
    loss, lse, _, _ = ops.supcon_rows(zz, y, tau, margin, operand)
    (loss.sum() + 0.5 * lse.sum()).backward()
    return loss.detach(), lse.detach(), zz.grad


@pytest.mark.parametrize("operand", [torch.bfloat16, torch.float16], ids=str)
def test_half_products_agree_with_float_products(ops, monkeypatch, operand):
    """Forward: s is the same fp32 products of the same 16-bit values (sums in another order);
    backward: only G's rounding to 16 bits differs, well inside the conformance tolerance."""
    z, y = rows(1300, 40, torch.float32, classes=7, seed=11)  # crosses the 1024-column tile
    monkeypatch.setenv("FFKERN_CPU_HALF_PRODUCTS", "float")
    f_loss, f_lse, f_dz = supcon_fwd_bwd(ops, z, y, operand)
    monkeypatch.setenv("FFKERN_CPU_HALF_PRODUCTS", "half")
    h_loss, h_lse, h_dz = supcon_fwd_bwd(ops, z, y, operand)
    close(h_loss, f_loss, 2e-5, "L")
    close(h_lse, f_lse, 2e-5, "lse")
    close(h_dz, f_dz, {torch.bfloat16: 1e-2, torch.float16: 2e-3}[operand] * f_dz.abs().max().item(), "dz")
    assert not torch.equal(h_dz, f_dz), "forcing 16-bit products changed nothing: the path was not taken"
    again = supcon_fwd_bwd(ops, z, y, operand)
    for first, second in zip((h_loss, h_lse, h_dz), again):
        assert torch.equal(first, second), "16-bit products must be bitwise reproducible run to run"


def test_fp16_gradient_is_scaled_before_rounding(ops, monkeypatch):
    """Coefficients of 1e-9 give G ~ 1e-12, below fp16's smallest subnormal: unscaled it would
    round to zero. The power-of-two scale keeps dz accurate."""
    z, y = rows(300, 24, torch.float32, classes=5, seed=12)
    zh = z.to(torch.float16)
    lse = reference.supcon_forward(zh.double(), y, zh.double(), y, 0, 0.15, 0.4)[1].float()
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(300, generator=gen) * 1e-9
    b = torch.rand(300, generator=gen) * 1e-9
    args = (zh, y, zh, y, 0, lse, a, b, lse, a, b, 0.15, 0.4)
    monkeypatch.setenv("FFKERN_CPU_HALF_PRODUCTS", "half")
    got = ops.supcon_backward(*args)
    expected = reference.supcon_backward(*(t.double() if torch.is_tensor(t) and t.is_floating_point() else t
                                           for t in args))
    assert got.abs().max() > 0
    err = (got.double() - expected).abs().max().item() / expected.abs().max().item()
    assert err < 2e-3, f"relative error {err:.3g}"


@pytest.mark.parametrize("operand", [torch.bfloat16, torch.float16], ids=str)
def test_automatic_choice_follows_the_cpu(ops, monkeypatch, operand):
    """Without the variable, 16-bit products are used exactly where the CPU has bf16 (AMX or
    AVX512-BF16) or fp16 (AMX-FP16) units; elsewhere the bits are those of the fp32 products."""
    z, y = rows(600, 32, torch.float32, classes=5, seed=13)
    monkeypatch.delenv("FFKERN_CPU_HALF_PRODUCTS", raising=False)
    auto = supcon_fwd_bwd(ops, z, y, operand)
    native = _has("amx_bf16", "avx512_bf16") if operand == torch.bfloat16 else _has("amx_fp16")
    monkeypatch.setenv("FFKERN_CPU_HALF_PRODUCTS", "half" if native else "float")
    forced = supcon_fwd_bwd(ops, z, y, operand)
    for a, f in zip(auto, forced):
        assert torch.equal(a, f)


def test_bad_products_setting_is_an_error(ops, monkeypatch):
    z, y = rows(10, 4, torch.bfloat16)
    monkeypatch.setenv("FFKERN_CPU_HALF_PRODUCTS", "amx")
    with pytest.raises(RuntimeError, match="FFKERN_CPU_HALF_PRODUCTS"):
        ops.supcon_forward(z, y, z, y, 0, 0.15, 0.4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backward_with_widely_spread_lse_takes_two_exps(ops, highest_precision, dtype):
    """tau = 0.01 with some rows duplicated: their lse is ~100, that of the others far lower (a
    spread above 40), so those tiles take the two-exp form; both forms against the reference."""
    z, y = rows(400, 64, torch.float64, classes=3, seed=14)
    z[200:260] = z[:60]  # exact duplicates: s = 1 for those pairs
    z, y = z.to(dtype), y
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for tau in (0.01, 0.15):
        lse = reference.supcon_forward(z, y, z, y, 0, tau, 0.2)[1]
        if tau == 0.01:
            assert (lse.max() - lse.min()).item() > 40
        gen = torch.Generator().manual_seed(5)
        a = torch.rand(400, generator=gen, dtype=torch.float64).to(dtype)
        b = torch.rand(400, generator=gen, dtype=torch.float64).to(dtype)
        args = (z[50:350], y[50:350], z, y, 50, lse[50:350], a[50:350], b[50:350], lse, a, b, tau, 0.2)
        close(ops.supcon_backward(*args), reference.supcon_backward(*args), tol, f"dz tau={tau}")


def test_public_bf16_loss_matches_reference_on_both_paths(monkeypatch):
    """The public function in bf16 on either path, against the float64 reference (conformance
    tolerance for bf16)."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(300, 2, 48, generator=gen).to(torch.bfloat16)
    y = torch.randint(0, 10, (300,), generator=gen)
    xr = x.double().requires_grad_()
    expected = ffkern.marginal_supcon_loss(xr, y, margin=0.4, backend="reference")
    expected.backward()
    for mode in ("half", "float"):
        monkeypatch.setenv("FFKERN_CPU_HALF_PRODUCTS", mode)
        xx = x.clone().requires_grad_()
        got = ffkern.marginal_supcon_loss(xx, y, margin=0.4, backend="cpp")
        got.backward()
        assert abs(got.item() - expected.item()) <= 3e-2 * max(1.0, abs(expected.item()))
        err = (xx.grad.double() - xr.grad).abs().max().item()
        assert err <= 3e-2 * max(1.0, xr.grad.abs().max().item()), f"{mode}: grad error {err:.3g}"


@pytest.mark.parametrize("shape,skip", [((2048, 1040), 0), ((1024, 9, 520), 1)], ids=["BD", "BTD-skip1-unaligned"])
def test_large_ff_gradients_streamed_match_reference(shape, skip):
    """Gradients of 8 MiB and more are written with streaming stores (rows not 64-byte aligned in
    the second case: D=520 floats): same values as the reference, to fp32 rounding."""
    gen = torch.Generator().manual_seed(16)
    hp = torch.randn(shape, generator=gen).requires_grad_()
    hn = torch.randn(shape, generator=gen).requires_grad_()
    assert hp.numel() * 4 >= 8 << 20
    cases = [
        (lambda a, b: ffkern.ff_goodness(a, skip_tokens=skip, backend="cpp").sum(),
         lambda a, b: reference.goodness(a, "mean", skip).sum()),
        (lambda a, b: ffkern.ff_loss(a, b, threshold=1.0, skip_tokens=skip, backend="cpp"),
         lambda a, b: reference.ff_loss(a, b, 1.0, "mean", skip)),
        (lambda a, b: ffkern.sffa_loss(a, b, skip_tokens=skip, backend="cpp"),
         lambda a, b: reference.sffa_loss(a, b, "mean", skip)),
    ]
    for ours, ref in cases:
        a, b = hp.detach().clone().requires_grad_(), hn.detach().clone().requires_grad_()
        ra, rb = hp.detach().double().requires_grad_(), hn.detach().double().requires_grad_()
        ours(a, b).backward()
        ref(ra, rb).backward()
        close(a.grad, ra.grad, 2e-5 * ra.grad.abs().max().item(), "dh_pos")
        if b.grad is not None:
            close(b.grad, rb.grad, 2e-5 * rb.grad.abs().max().item(), "dh_neg")


@pytest.mark.parametrize("case", ["goodness", "ff", "sffa_activity"])
def test_ff_backward_writes_no_zero_gradients_for_saved_statistics(case):
    """The fused forwards' token means [B, D] (and SFFA's (L_S, A)) are saved for the backward, not
    results: autograd must not fill a zero gradient for them on every call (1/T of h's bytes, a few
    per cent of the backward). Records every operator the backward dispatches and refuses any
    zero fill of a tensor shaped like a saved statistic."""
    from torch.utils._python_dispatch import TorchDispatchMode

    batch, tokens, dim = 64, 5, 48
    hp = torch.randn(batch, tokens, dim).requires_grad_()
    hn = torch.randn(batch, tokens, dim).requires_grad_()
    if case == "goodness":
        loss = ffkern.ff_goodness(hp, skip_tokens=1, backend="cpp").sum()
    elif case == "ff":
        loss = ffkern.ff_loss(hp, hn, threshold=1.0, skip_tokens=1, backend="cpp")
    else:
        loss = ffkern.sffa_loss(hp, hn, skip_tokens=1, activity_term=True, backend="cpp")
    zero_fills = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("zeros", "zeros_like", "zero_", "new_zeros") or (name == "fill_" and args[1] == 0):
                if isinstance(out, torch.Tensor) and tuple(out.shape) in ((batch, dim), (2,)):
                    zero_fills.append((name, tuple(out.shape)))
            return out

    with Record():
        loss.backward()
    assert zero_fills == [], f"the backward zero-filled gradients of saved statistics: {zero_fills}"
    assert hp.grad is not None and hp.grad.abs().sum() > 0


def _pair_cases(skip):
    return {
        "ff": (lambda a, b: ffkern.ff_loss(a, b, threshold=2.0, skip_tokens=skip, backend="cpp"),
               lambda a, b: reference.ff_loss(a, b, 2.0, "mean", skip)),
        "symba": (lambda a, b: ffkern.symba_loss(a, b, alpha=4.0, skip_tokens=skip, backend="cpp"),
                  lambda a, b: reference.symba_loss(a, b, 4.0, "mean", skip)),
        "sffa": (lambda a, b: ffkern.sffa_loss(a, b, skip_tokens=skip, backend="cpp"),
                 lambda a, b: reference.sffa_loss(a, b, "mean", skip)),
    }


@pytest.mark.parametrize("loss", ["ff", "symba", "sffa"])
@pytest.mark.parametrize("shape,skip,dtype", [((1000, 64), 0, torch.float32), ((333, 5, 96), 1, torch.float32),
                                              ((1000, 64), 0, torch.bfloat16), ((200, 3, 2000), 1, torch.float32)],
                         ids=["BD-f32", "BTD-f32", "BD-bf16", "BTD-wide"])
def test_pair_losses_in_sample_blocks_match_reference(loss, shape, skip, dtype):
    """The pair losses form a block of samples' energies and then the block's terms (vectorized
    softplus / sigmoid for float32): batches that are not a multiple of the block, several threads,
    wide rows (smaller blocks), 16-bit inputs (means in the block's buffer); values and gradients
    against the float64 reference."""
    gen = torch.Generator().manual_seed(21)
    hp = (1.5 * torch.randn(shape, generator=gen)).to(dtype)
    hn = (1.5 * torch.randn(shape, generator=gen)).to(dtype)
    ours, ref = _pair_cases(skip)[loss]
    a, b = hp.clone().requires_grad_(), hn.clone().requires_grad_()
    ra, rb = hp.double().requires_grad_(), hn.double().requires_grad_()
    got, expected = ours(a, b), ref(ra, rb)
    got.backward()
    expected.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(got.item() - expected.item()) <= tol * max(1.0, abs(expected.item())), (got.item(), expected.item())
    close(a.grad, ra.grad, tol * ra.grad.abs().max().item(), "dh_pos")
    close(b.grad, rb.grad, tol * rb.grad.abs().max().item(), "dh_neg")


@pytest.mark.parametrize("loss", ["ff", "symba"])
def test_softplus_and_sigmoid_tails_are_relatively_accurate(loss):
    """Every sample far in softplus' tail (terms e^-20 .. e^-40): the loss, a mean of tiny terms,
    and its gradient must keep their relative accuracy (log(1 + u) instead of log1p(u) would return
    0 for every term here; a sigmoid that underflowed early would zero the gradient)."""
    batch, dim, theta, alpha = 1000, 64, 50.0, 4.0
    gen = torch.Generator().manual_seed(22)
    margin = 20.0 + 20.0 * torch.rand(batch, generator=gen, dtype=torch.float64)
    if loss == "ff":  # g+ = theta + margin, g- = theta - margin: both terms in the tail
        gp, gn = theta + margin, theta - margin
    else:  # alpha (g+ - g-) = margin
        gn = torch.rand(batch, generator=gen, dtype=torch.float64)
        gp = gn + margin / alpha
    signs = torch.where(torch.rand(batch, dim, generator=gen) < 0.5, -1.0, 1.0).double()
    hp64, hn64 = gp.sqrt()[:, None] * signs, gn.sqrt()[:, None] * signs  # mean(h^2) = g exactly in float64
    hp, hn = hp64.float(), hn64.float()
    if loss == "ff":
        ours = lambda u, v: ffkern.ff_loss(u, v, threshold=theta, backend="cpp")  # noqa: E731
        ref = lambda u, v: reference.ff_loss(u, v, theta, "mean", 0)  # noqa: E731
    else:
        ours, ref = _pair_cases(0)[loss]
    a, b = hp.clone().requires_grad_(), hn.clone().requires_grad_()
    ra, rb = hp.double().requires_grad_(), hn.double().requires_grad_()  # the reference on the same fp32 values
    got, expected = ours(a, b), ref(ra, rb)
    got.backward()
    expected.backward()
    assert expected.item() > 0 and expected.item() < 1e-6
    assert abs(got.item() - expected.item()) <= 1e-4 * expected.item(), (got.item(), expected.item())
    for g, e, what in ((a.grad, ra.grad, "dh_pos"), (b.grad, rb.grad, "dh_neg")):
        err = (g.double() - e).abs()
        bad = err > 1e-4 * e.abs() + 1e-37
        assert not bad.any(), f"{what}: {int(bad.sum())} entries off by more than 1e-4 relative"


def test_pair_backward_without_saved_means_matches_with_them():
    """pair_loss_backward given no token means forms them again in the block's buffer: the same
    gradient as from the saved means (the autograd path), for several blocks and threads."""
    ops = torch.ops.ffkern
    gen = torch.Generator().manual_seed(23)
    hp, hn = torch.randn(300, 6, 80, generator=gen), torch.randn(300, 6, 80, generator=gen)
    _, _, mp, mn, _ = ops.pair_loss_fused(hp, hn, "symba", 4.0, "mean", 1, False)
    grad = torch.tensor(1.0)
    saved = ops.pair_loss_backward(grad, hp, hn, "symba", 4.0, "mean", 1, None, mp, mn)
    recomputed = ops.pair_loss_backward(grad, hp, hn, "symba", 4.0, "mean", 1, None, None, None)
    for s, r, what in zip(saved, recomputed, ("dh_pos", "dh_neg")):
        close(r, s, 1e-6 * s.abs().max().item(), what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("loss,param", [("ff", 1.0), ("symba", 4.0), ("sffa", 0.0)])
@pytest.mark.parametrize("shape,skip", [((300, 80), 0), ((300, 6, 80), 1), ((70, 3, 40), 2)],
                         ids=["BD", "BTD-skip1", "BTD-one-kept"])
def test_pair_forward_saves_the_energies_the_backward_would_form(ops, shape, skip, loss, param, dtype):
    """pair_loss_fused's fifth output: (E0+, E1+, E0-, E1-) per sample, the halves' energies of the
    token means (SPEC 2), in the accumulation type. Given them, pair_loss_backward skips forming them
    again (at [B, D] a second read of h): the same gradient bit for bit as without them."""
    gen = torch.Generator().manual_seed(24)
    hp, hn = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _, _, mp, mn, energies = ops.pair_loss_fused(hp, hn, loss, param, "mean", skip, False)
    assert energies.dtype == acc and energies.shape == (shape[0], 4)
    half = shape[-1] // 2
    expected = []
    for h in (hp, hn):
        m = h.double() if h.dim() == 2 else h.double()[:, skip:].mean(1)
        expected += [m[:, :half].square().sum(1), m[:, half:].square().sum(1)]
    close(energies, torch.stack(expected, 1), 1e-12 if dtype == torch.float64 else 1e-5, "energies")
    grad = torch.tensor(1.5, dtype=acc)
    activity = ops.pair_loss_fused(hp, hn, loss, param, "mean", skip, True)[1] if loss == "sffa" else None
    given = ops.pair_loss_backward(grad, hp, hn, loss, param, "mean", skip, activity, mp, mn, energies)
    formed = ops.pair_loss_backward(grad, hp, hn, loss, param, "mean", skip, activity, mp, mn, None)
    for a, b in zip(given, formed):
        assert torch.equal(a, b)
    other = ops.pair_loss_backward(grad, hp, hn, loss, param, "mean", skip, activity, mp, mn, energies * 2)
    assert not torch.equal(other[0], given[0]), "the given energies were not used"
    with pytest.raises(RuntimeError, match=r"energies must be \[B, 4\]"):
        ops.pair_loss_backward(grad, hp, hn, loss, param, "mean", skip, activity, mp, mn, energies[:, :2])
    with pytest.raises(RuntimeError, match="energies must be"):
        ops.pair_loss_backward(grad, hp, hn, loss, param, "mean", skip, activity, mp, mn, energies.half())


@pytest.mark.parametrize("shape,skip", [((2048, 1040), 0), ((1024, 9, 520), 1)], ids=["BD", "BTD-skip1-unaligned"])
def test_streamed_gradient_has_the_bits_of_the_plain_stores(shape, skip):
    """The streamed stores (a gradient of 8 MiB and more; AVX-512 or AVX2 by the CPU) write the same
    products as the plain stores of a small call: the first 64 samples' dh, bit for bit."""
    h = torch.randn(shape, generator=torch.Generator().manual_seed(17))
    big = h.clone().requires_grad_()
    small = h[:64].clone().requires_grad_()
    assert big.numel() * 4 >= 8 << 20 and small.numel() * 4 < 8 << 20
    weights = torch.rand(shape[0], generator=torch.Generator().manual_seed(18))
    (ffkern.ff_goodness(big, skip_tokens=skip, backend="cpp") * weights).sum().backward()
    (ffkern.ff_goodness(small, skip_tokens=skip, backend="cpp") * weights[:64]).sum().backward()
    assert torch.equal(big.grad[:64], small.grad)
