"""The conformance suite: every backend against the reference (the executable spec), values and
gradients, on random inputs and the edge cases of SPEC.md, plus float64 gradcheck.

The reference runs on the CPU in float64 on the same input values; a backend runs on its device
in the input dtype. A new backend joins by being registered in ffkern._backend.BACKENDS.
"""
import math

import pytest
import torch

import ffkern
from conftest import backend_cases

BACKEND_CASES = backend_cases()
FAST_BACKEND_CASES = [c for c in BACKEND_CASES if c.values[0] != "reference"] or BACKEND_CASES

# (rtol, atol) of values and gradients, relative to the largest magnitude for low precision
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual, expected, dtype, what):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max abs error {err:.3g} > {TOL[dtype] * scale:.3g}"


def make_features(layout, batch, views, dim, dtype, device, gen, scale=1.0):
    """Leaf tensors in the requested layout (SPEC 1.1) and a function returning them as float64 CPU."""
    if layout == "flat":
        leaves = [(torch.randn(batch, dim, generator=gen, dtype=torch.float64) * scale)]
    elif layout == "bvd":
        leaves = [(torch.randn(batch, views, dim, generator=gen, dtype=torch.float64) * scale)]
    else:
        leaves = [(torch.randn(batch, dim, generator=gen, dtype=torch.float64) * scale) for _ in range(views)]
    leaves = [t.to(dtype) for t in leaves]  # round once; both sides see the same values
    ours = [t.to(device, copy=True).requires_grad_() for t in leaves]
    ref = [t.to(torch.float64, copy=True).requires_grad_() for t in leaves]
    as_input = (lambda ts: ts[0]) if layout in ("flat", "bvd") else (lambda ts: list(ts))
    return ours, ref, as_input


# name, layout, batch, views, dim, labels ("random", "equal", "distinct", "singletons", None), margin, tau, kwargs
SUPCON_CASES = [
    ("flat-oddN-oddD", "flat", 37, 1, 130, "random", 0.4, 0.15, {}),
    ("bvd-sum", "bvd", 13, 2, 33, "random", 0.0, 0.05, dict(reduction="sum")),
    ("list-V3-none", "list", 11, 3, 240, "random", 0.4, 1.0, dict(reduction="none")),
    ("all-equal-margin2", "bvd", 9, 2, 17, "equal", 2.0, 0.15, {}),
    ("all-distinct", "flat", 21, 1, 19, "distinct", 0.4, 0.15, {}),
    ("anchors-without-positives", "flat", 29, 1, 24, "singletons", 0.4, 0.3, {}),
    ("simclr", "list", 15, 2, 40, None, 0.4, 0.15, {}),
    ("simclr-V3-margin2", "bvd", 7, 3, 16, None, 2.0, 0.5, dict(reduction="sum")),
    ("multi-block", "bvd", 37, 2, 64, "random", 0.4, 0.15, {}),
    ("wide-D-chunked", "flat", 35, 1, 300, "random", 0.4, 0.15, {}),
    ("no-normalize", "list", 10, 2, 12, "random", 0.3, 0.5, dict(normalize=False)),
    ("base-temperature", "bvd", 12, 2, 20, "random", 0.4, 0.1, dict(base_temperature=0.07)),
    ("single-anchor", "flat", 1, 1, 8, "random", 0.4, 0.15, {}),
    ("one-view-labels", "list", 17, 1, 10, "random", 0.4, 0.15, dict(reduction="none")),
]


def make_labels(kind, batch, gen):
    if kind is None:
        return None
    if kind == "random":
        return torch.randint(0, 4, (batch,), generator=gen)
    if kind == "equal":
        return torch.zeros(batch, dtype=torch.long)
    if kind == "distinct":
        return torch.arange(batch)
    if kind == "singletons":  # half the samples share classes, the rest have no positive
        labels = torch.arange(batch) + 100
        labels[: batch // 2] = torch.randint(0, 3, (batch // 2,), generator=gen)
        return labels
    raise AssertionError(kind)


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SUPCON_CASES, ids=[c[0] for c in SUPCON_CASES])
@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_supcon_matches_reference(backend, device, case, dtype):
    name, layout, batch, views, dim, label_kind, margin, tau, kwargs = case
    gen = torch.Generator().manual_seed(hash(name) % 2**31)
    scale = 0.3 if kwargs.get("normalize") is False else 1.0
    ours, ref, as_input = make_features(layout, batch, views, dim, dtype, device, gen, scale)
    labels = make_labels(label_kind, batch, gen)
    opts = dict(temperature=tau, margin=margin, **kwargs)

    expected, ref_stats = ffkern.marginal_supcon_loss(as_input(ref), labels, backend="reference", return_stats=True, **opts)
    got, stats = ffkern.marginal_supcon_loss(as_input(ours), None if labels is None else labels.to(device),
                                             backend=backend, return_stats=True, **opts)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == expected.shape
    assert_close(got, expected, dtype, f"{name} loss")
    if dtype in (torch.float32, torch.float64):  # half-precision rounding of s may move a pair across the clip boundary
        assert torch.equal(stats.num_positives.cpu(), ref_stats.num_positives)
        assert torch.equal(stats.num_clipped.cpu(), ref_stats.num_clipped)

    weights = torch.rand(expected.shape, generator=gen, dtype=torch.float64)  # a non-trivial upstream gradient
    (expected * weights).sum().backward()
    (got * weights.to(device)).sum().backward()
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.grad is not None and a.grad.dtype == dtype
        assert_close(a.grad, b.grad, dtype, f"{name} grad of input {i}")


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("margin", [0.0, 0.4, 2.0])
def test_supcon_gradcheck_float64(backend, device, margin):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 2, 5, generator=gen, dtype=torch.float64, device="cpu").to(device).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 0], device=device)
    fn = lambda x: ffkern.marginal_supcon_loss(x, labels, temperature=0.3, margin=margin, backend=backend, reduction="none")
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", FAST_BACKEND_CASES)
def test_supcon_zero_row_follows_the_eps_clamp(backend, device):
    """A zero feature row: z = x / max(||x||, 1e-12) = 0, and its gradient is dL/dz / 1e-12 with no
    projection (F.normalize's clamp), whether the backend normalizes in PyTorch or in its kernels."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 2, 7, generator=gen, dtype=torch.float64)
    x[3, 1] = 0.0
    x[5, 0] = 1e-13  # below eps too, not exactly zero
    labels = torch.tensor([0, 1, 0, 1, 2, 0, 1, 2, 0])
    ref_x, our_x = x.clone().requires_grad_(), x.to(device).requires_grad_()
    expected = ffkern.marginal_supcon_loss(ref_x, labels, margin=0.4, backend="reference")
    got = ffkern.marginal_supcon_loss(our_x, labels.to(device), margin=0.4, backend=backend)
    assert_close(got, expected, torch.float64, "loss")
    expected.backward()
    got.backward()
    assert ref_x.grad.abs().max() > 1e6  # the clamp's 1/eps scale is really exercised
    torch.testing.assert_close(our_x.grad.cpu(), ref_x.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("temperature", [0.05, 0.15, 0.5, 1.0])
@pytest.mark.parametrize("backend,device", FAST_BACKEND_CASES)
def test_supcon_temperatures(backend, device, temperature):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(19, 2, 23, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (19,), generator=gen)
    expected = ffkern.marginal_supcon_loss(x, labels, temperature=temperature, margin=0.4, backend="reference")
    got = ffkern.marginal_supcon_loss(x.to(device), labels.to(device), temperature=temperature, margin=0.4, backend=backend)
    assert_close(got, expected, torch.float64, "loss")


def test_supcon_hand_computed():
    """Three unit vectors with s12 = 0, s13 = 0.6, s23 = 0.8 (tau = 0.5), computed by hand from SPEC 1.2."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    tau = 0.5
    # labels [0, 0, 1], m = 0.3: anchor 1 has positive 2 (t = 0 + 0.3), negative 3 (s = 0.6);
    # anchor 2 has positive 1 (t = 0.3), negative 3 (s = 0.8); anchor 3 has no positive (L = 0).
    l1 = math.log(math.exp(0.3 / tau) + math.exp(0.6 / tau)) - 0.3 / tau
    l2 = math.log(math.exp(0.3 / tau) + math.exp(0.8 / tau)) - 0.3 / tau
    # labels [0, 1, 1], m = 0.5: the positive pair (2, 3) clips: min(0.8 + 0.5, 1) = 1.
    l2c = math.log(math.exp(0.0 / tau) + math.exp(1.0 / tau)) - 1.0 / tau
    l3c = math.log(math.exp(0.6 / tau) + math.exp(1.0 / tau)) - 1.0 / tau
    for backend in [c.values[0] for c in BACKEND_CASES if not c.marks and c.values[1] == "cpu"]:
        out = ffkern.marginal_supcon_loss(z, torch.tensor([0, 0, 1]), temperature=tau, margin=0.3, reduction="none", backend=backend)
        torch.testing.assert_close(out, torch.tensor([l1, l2, 0.0], dtype=torch.float64), rtol=1e-6, atol=1e-7)
        loss, stats = ffkern.marginal_supcon_loss(z, torch.tensor([0, 1, 1]), temperature=tau, margin=0.5, backend=backend, return_stats=True)
        assert loss.item() == pytest.approx((l2c + l3c) / 3, rel=1e-6)
        assert stats.num_positives.tolist() == [0, 1, 1] and stats.num_clipped.tolist() == [0, 1, 1]
        assert stats.clipped_fraction.item() == 1.0
        # the clipped pair passes no gradient: L2 depends on z only through s21 (and L3 through s31)
        zg = z.clone().requires_grad_()
        ffkern.marginal_supcon_loss(zg, torch.tensor([0, 1, 1]), temperature=tau, margin=0.5, normalize=False,
                                    reduction="sum", backend=backend).backward()
        p21 = math.exp(0.0) / (math.exp(0.0) + math.exp(1.0 / tau))
        p31 = math.exp(0.6 / tau) / (math.exp(0.6 / tau) + math.exp(1.0 / tau))
        # dL/dz1 = (dL2/ds21 + dL3/ds31 terms) = p21/tau z2 + p31/tau z3
        expected_dz1 = (p21 * z[1] + p31 * z[2]) / tau
        torch.testing.assert_close(zg.grad[0], expected_dz1, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- FF goodness losses (SPEC 2)

FF_SHAPES = [(7, 130), (5, 4, 6), (3, 1, 8), (33, 240)]


def ff_inputs(shape, dtype, device, gen, scale=1.0):
    leaves = [(torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype) for _ in range(2)]
    return ([t.to(device, copy=True).requires_grad_() for t in leaves],
            [t.to(torch.float64, copy=True).requires_grad_() for t in leaves])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["mean", "sum"])
@pytest.mark.parametrize("shape", FF_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", ["ff", "symba", "sffa", "goodness"])
@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_ff_losses_match_reference(backend, device, loss, shape, kind, dtype):
    if loss == "sffa" and shape[-1] % 2:
        pytest.skip("SFFA needs an even D (odd D is a ValueError, tested below)")
    gen = torch.Generator().manual_seed(11)
    skip = 1 if len(shape) == 3 and shape[1] > 1 else 0
    scale = 2.0 if kind == "mean" else 0.4  # goodness near the threshold: both softplus branches matter
    ours, ref, = ff_inputs(shape, dtype, device, gen, scale)

    def run(h, backend):
        if loss == "goodness":
            return ffkern.ff_goodness(h[0], kind=kind, skip_tokens=skip, backend=backend)
        fn = {"ff": ffkern.ff_loss, "symba": ffkern.symba_loss, "sffa": ffkern.sffa_loss}[loss]
        return fn(h[0], h[1], kind=kind, skip_tokens=skip, backend=backend)

    expected, got = run(ref, "reference"), run(ours, backend)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, expected, dtype, f"{loss} value")
    weights = torch.rand(expected.shape, generator=gen, dtype=torch.float64)
    (expected * weights).sum().backward()
    (got * weights.to(device)).sum().backward()
    for a, b in zip(ours, ref):
        if b.grad is None:
            assert a.grad is None or not a.grad.any()
            continue
        assert a.grad.dtype == dtype
        assert_close(a.grad, b.grad, dtype, f"{loss} grad")


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("loss", ["ff", "symba", "sffa", "goodness"])
def test_ff_gradcheck_float64(backend, device, loss):
    gen = torch.Generator().manual_seed(5)
    h_pos = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    h_neg = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    fns = {
        "ff": lambda a, b: ffkern.ff_loss(a, b, threshold=1.0, skip_tokens=1, backend=backend),
        "symba": lambda a, b: ffkern.symba_loss(a, b, skip_tokens=1, backend=backend),
        "sffa": lambda a, b: ffkern.sffa_loss(a, b, skip_tokens=1, backend=backend),
        "goodness": lambda a, b: ffkern.ff_goodness(a, skip_tokens=1, backend=backend) * ffkern.ff_goodness(b, kind="sum", backend=backend),
    }
    assert torch.autograd.gradcheck(fns[loss], (h_pos, h_neg), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", FAST_BACKEND_CASES)
def test_sffa_clamp_passes_no_gradient(backend, device):
    """q is clamped to [1e-4, 1 - 1e-4]; outside, the clamp passes no gradient (torch.clamp)."""
    h_pos = torch.zeros(2, 6, dtype=torch.float64)
    h_pos[:, :3] = 1.0  # all energy in the positive half: q = 1, clamped
    h_neg = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h_pos, h_neg = h_pos.to(device).requires_grad_(), h_neg.to(device).requires_grad_()
    loss = ffkern.sffa_loss(h_pos, h_neg, backend=backend)
    ref = ffkern.sffa_loss(h_pos.detach().cpu(), h_neg.detach().cpu(), backend="reference")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    loss.backward()
    assert not h_pos.grad.any()


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_sffa_all_zero_sample_is_finite(backend, device):
    """An all-zero sample (every ReLU unit off) has q = 1/2 and passes no gradient, instead of 0/0."""
    h_pos = torch.randn(3, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h_neg = torch.randn(3, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    h_pos[1] = 0.0
    h_neg[2] = 0.0
    h_pos, h_neg = h_pos.to(device).requires_grad_(), h_neg.to(device).requires_grad_()
    loss = ffkern.sffa_loss(h_pos, h_neg, skip_tokens=1, backend=backend)
    assert torch.isfinite(loss)
    ref = ffkern.sffa_loss(h_pos.detach().cpu(), h_neg.detach().cpu(), skip_tokens=1, backend="reference")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    loss.backward()
    assert torch.isfinite(h_pos.grad).all() and torch.isfinite(h_neg.grad).all()
    assert not h_pos.grad[1].any() and not h_neg.grad[2].any()


def test_modules_match_functions():
    gen = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    labels = torch.randint(0, 3, (8,), generator=gen)
    criterion = ffkern.MarginalSupConLoss(temperature=0.15, margin=0.3)
    assert criterion([x1, x2], labels).item() == ffkern.marginal_supcon_loss([x1, x2], labels, margin=0.3).item()
    assert criterion([x1, x2], labels, reduction="sum").item() == pytest.approx(
        16 * criterion([x1, x2], labels).item(), rel=1e-6)
    assert ffkern.FFLoss(threshold=1.5)(x1, x2).item() == ffkern.ff_loss(x1, x2, threshold=1.5).item()
    assert ffkern.SymBaLoss(alpha=2.0)(x1, x2).item() == ffkern.symba_loss(x1, x2, alpha=2.0).item()
    h1, h2 = torch.randn(4, 3, 6, generator=gen), torch.randn(4, 3, 6, generator=gen)
    assert ffkern.SFFALoss(skip_tokens=1)(h1, h2).item() == ffkern.sffa_loss(h1, h2, skip_tokens=1).item()


# ---------------------------------------------------------------- SFFA's activity term (SPEC 2)

def authors_sffa(h_pos, h_neg):
    """SFFA as its authors' code writes it for [B, D] (erikberter/SFFA_CoLLAS, ff_mod/loss/loss.py,
    ProbabilityBCELoss with use_normalization, and the ratio goodness of ff_network.py), in float64."""
    def q(x):
        mid = x.shape[1] // 2
        return torch.clamp(x[:, :mid].pow(2).sum(1) / x.pow(2).sum(1), 1e-4, 1 - 1e-4)

    loss_1 = -torch.log(torch.cat([q(h_pos), 1 - q(h_neg)])).mean()
    return loss_1 * (1 + torch.exp(-10 * (h_pos.mean() + h_neg.mean())))


def test_sffa_activity_is_the_authors_formula():
    gen = torch.Generator().manual_seed(21)
    h_pos = torch.rand(9, 12, generator=gen, dtype=torch.float64) * 0.2  # ReLU-like: A well above 1
    h_neg = torch.rand(9, 12, generator=gen, dtype=torch.float64) * 0.2
    ours = ffkern.sffa_loss(h_pos, h_neg, activity_term=True, backend="reference")
    assert ours.item() == pytest.approx(authors_sffa(h_pos, h_neg).item(), rel=1e-12)
    plain = ffkern.sffa_loss(h_pos, h_neg, backend="reference")
    assert ours.item() > 1.1 * plain.item()  # the term is really there
    with pytest.raises(TypeError, match="activity_term"):
        ffkern.sffa_loss(h_pos, h_neg, activity_term=1)


SFFA_ACTIVITY_SHAPES = [(7, 130), (5, 4, 6), (3, 1, 8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SFFA_ACTIVITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_sffa_activity_matches_reference(backend, device, shape, dtype):
    gen = torch.Generator().manual_seed(12)
    skip = 1 if len(shape) == 3 and shape[1] > 1 else 0
    leaves = [(torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.3 - 0.05).to(dtype) for _ in range(2)]
    ours = [t.to(device, copy=True).requires_grad_() for t in leaves]
    ref = [t.to(torch.float64, copy=True).requires_grad_() for t in leaves]
    expected = ffkern.sffa_loss(*ref, skip_tokens=skip, activity_term=True, backend="reference")
    got = ffkern.sffa_loss(*ours, skip_tokens=skip, activity_term=True, backend=backend)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, expected, dtype, "sffa activity value")
    expected.backward()
    got.backward()
    for a, b in zip(ours, ref):
        assert a.grad.dtype == dtype
        assert_close(a.grad, b.grad, dtype, "sffa activity grad")
        if skip:
            assert not a.grad[:, :skip].any()  # skipped tokens enter neither q nor the means


# shape, skip_tokens, offset of the values (rand * 0.3 - offset): A from ~1.4 to ~e^6
SFFA_ACTIVITY_GRADCHECK = [((4, 3, 6), 1, 0.0), ((5, 6), 0, 0.1), ((3, 4, 8), 2, 0.3), ((1, 6), 0, 0.0),
                           ((1, 2, 4), 1, 0.2)]


@pytest.mark.parametrize("shape,skip,offset", SFFA_ACTIVITY_GRADCHECK,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_sffa_activity_gradcheck_float64(backend, device, shape, skip, offset):
    """Both terms of dL/dh = A dL_S/dh + L_S dA/dh (A differentiated, not detached), [B, D] and
    tokens [B, T, D] with skipped tokens, B = 1 included."""
    gen = torch.Generator().manual_seed(6)
    h_pos, h_neg = [(torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.3 - offset).to(device).requires_grad_()
                    for _ in range(2)]
    fn = lambda a, b: ffkern.sffa_loss(a, b, skip_tokens=skip, activity_term=True, backend=backend)
    assert torch.autograd.gradcheck(fn, (h_pos, h_neg), eps=1e-6, atol=1e-7, rtol=1e-5)


def _activity_case(backend, device, h_pos, h_neg, dtype, skip=0, what="sffa activity"):
    """Value and gradients of sffa_loss(activity_term=True) on the backend (in dtype) against the
    float64 reference on the same values; returns the backend's (loss, grad+, grad-)."""
    leaves = [h.to(dtype) for h in (h_pos, h_neg)]
    ours = [t.to(device, copy=True).requires_grad_() for t in leaves]
    ref = [t.to(torch.float64, copy=True).requires_grad_() for t in leaves]
    expected = ffkern.sffa_loss(*ref, skip_tokens=skip, activity_term=True, backend="reference")
    got = ffkern.sffa_loss(*ours, skip_tokens=skip, activity_term=True, backend=backend)
    assert_close(got, expected, dtype, f"{what} value")
    expected.backward()
    got.backward()
    for a, b in zip(ours, ref):
        assert_close(a.grad, b.grad, dtype, f"{what} grad")
    return got, ours[0].grad, ours[1].grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_sffa_activity_all_zero_sample(backend, device, dtype):
    """An all-zero sample passes no gradient through q (q = 1/2), but the activity factor's share,
    L_S dA/dh, reaches every kept entry, that sample's included (its values enter the means)."""
    gen = torch.Generator().manual_seed(14)
    h_pos, h_neg = [torch.rand(4, 3, 6, generator=gen, dtype=torch.float64) * 0.3 for _ in range(2)]
    h_pos[1] = 0.0
    h_neg[2] = 0.0
    got, g_pos, g_neg = _activity_case(backend, device, h_pos, h_neg, dtype, skip=1, what="all-zero sample")
    assert torch.isfinite(got) and torch.isfinite(g_pos).all() and torch.isfinite(g_neg).all()
    # the shift alone: the same value on every kept entry of the dead sample, none on the skipped token
    assert not g_pos[1, 0].any() and (g_pos[1, 1:] != 0).all()
    assert torch.allclose(g_pos[1, 1:], g_pos[1, 1, 0].expand(2, 6), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,offset", [(torch.float64, 1.0), (torch.float32, 3.0), (torch.float64, 30.0)],
                         ids=["float64-A~e^17", "float32-A~e^57", "float64-A~e^597"])
@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_sffa_activity_large_negative_means(backend, device, dtype, offset):
    """mu+ + mu- well below 0 (e.g. pre-activations, or a layer whose units mostly go negative):
    A = 1 + exp(-10 (mu+ + mu-)) is huge but finite, and the value and both gradient terms keep
    their relative accuracy (the shift term L_S (-10)(A - 1)/count grows with A too)."""
    gen = torch.Generator().manual_seed(15)
    h_pos, h_neg = [torch.rand(5, 2, 8, generator=gen, dtype=torch.float64) * 0.3 - offset for _ in range(2)]
    got, _, _ = _activity_case(backend, device, h_pos, h_neg, dtype, skip=1, what=f"offset {offset}")
    assert torch.isfinite(got) and got.item() > 1e6


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_sffa_activity_single_sample(backend, device):
    gen = torch.Generator().manual_seed(16)
    for shape, skip in (((1, 10), 0), ((1, 3, 4), 2)):
        h_pos, h_neg = [torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.3 - 0.05 for _ in range(2)]
        _activity_case(backend, device, h_pos, h_neg, torch.float32, skip=skip, what=f"B=1 {shape}")


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_sffa_activity_non_finite_gives_nan(backend, device):
    """NaN in, NaN out: a NaN activation makes its mean, so A and the loss, NaN (never finite)."""
    h_pos = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    h_pos[1, 2] = float("nan")
    loss = ffkern.sffa_loss(h_pos.to(device), h_pos.to(device) * 0.5, activity_term=True, backend=backend)
    assert math.isnan(loss.item())


TRITON_CASES = [c for c in BACKEND_CASES if c.values[0] == "triton"]


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_sffa_activity_is_fused_in_the_triton_kernels(monkeypatch, backend, device):
    """The triton backend takes A from its kernels' pass (no composition in PyTorch, no extra read
    of h): the composing helpers raise here, and the launchers are asked for the fused
    variant, forward once and backward once per input. (cpp: tests/test_cpp_ops.py.)"""
    from ffkern import reference
    from ffkern.kernels import ff_goodness as FG

    gen = torch.Generator().manual_seed(18)
    h_pos, h_neg = [torch.rand(4, 3, 6, generator=gen, dtype=torch.float64) * 0.3 for _ in range(2)]
    ref = [h.clone().requires_grad_() for h in (h_pos, h_neg)]
    expected = ffkern.sffa_loss(*ref, skip_tokens=1, activity_term=True, backend="reference")
    expected.backward()

    def composed(*args, **kwargs):
        raise AssertionError("the triton backend composed the activity factor in PyTorch")

    calls = []

    def recorded(fn, name):
        def wrapper(*args, **kwargs):
            calls.append((name, kwargs.get("activity", args[6] if len(args) > 6 else False)))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(reference, "sffa_activity", composed)
    monkeypatch.setattr(FG, "forward", recorded(FG.forward, "forward"))
    monkeypatch.setattr(FG, "backward", recorded(FG.backward, "backward"))
    ours = [h.to(device, copy=True).requires_grad_() for h in (h_pos, h_neg)]
    got = ffkern.sffa_loss(*ours, skip_tokens=1, activity_term=True, backend=backend)
    got.backward()
    assert calls == [("forward", True), ("backward", True), ("backward", True)]
    assert_close(got, expected, torch.float64, "fused value")
    for a, b in zip(ours, ref):
        assert_close(a.grad, b.grad, torch.float64, "fused grad")
    calls.clear()
    ffkern.sffa_loss(*ours, skip_tokens=1, backend=backend).backward()  # the plain loss: the plain variant
    assert calls == [("forward", False), ("backward", False), ("backward", False)]


@pytest.mark.parametrize("activity", [False, True])
@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_triton_pair_loss_operator_check(backend, device, activity):
    """torch.library.opcheck of ffkern_triton::pair_loss with and without the activity factor
    (schema, fake impl against the real outputs, autograd registration, AOT dispatch); the
    factor belongs to sffa only."""
    import ffkern.kernels  # noqa: F401 (registers the operators)

    gen = torch.Generator().manual_seed(20)
    op = torch.ops.ffkern_triton.pair_loss
    for shape, skip in (((4, 6), 0), ((3, 4, 8), 1)):
        hp, hn = [(torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.3).to(device).requires_grad_()
                  for _ in range(2)]
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        utils += ("test_aot_dispatch_dynamic",) if skip else ()  # the slow AOT-dispatch check once
        torch.library.opcheck(op, (hp, hn, "sffa", 0.0, "mean", skip, activity), test_utils=utils)
        _, coef, stats = op(hp, hn, "sffa", 0.0, "mean", skip, activity)
        assert coef.shape == ((6 if activity else 4), shape[0]) and stats.shape == ((2,) if activity else (0,))
    with pytest.raises(ValueError, match="activity"):
        op(hp, hn, "ff", 1.0, "mean", skip, True)


COMPILED_CASES = [c for c in BACKEND_CASES if c.values[0] != "reference"]


@pytest.mark.parametrize("backend,device", COMPILED_CASES)
def test_sffa_activity_modes(backend, device):
    """With the activity factor the operators keep every mode the plain loss has: a
    torch.compile(fullgraph=True) trace (opaque operators, fake impls) that matches eager, the
    float32 loss under CPU autocast, and the clear refusals of double backward and forward AD."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(19)
    h_pos, h_neg = [(torch.rand(4, 3, 6, generator=gen) * 0.3).to(device) for _ in range(2)]
    fn = lambda a, b: ffkern.sffa_loss(a, b, skip_tokens=1, activity_term=True, backend=backend)
    eager_in = [h.clone().requires_grad_() for h in (h_pos, h_neg)]
    eager = fn(*eager_in)
    eager_grads = torch.autograd.grad(eager, eager_in)
    torch._dynamo.reset()
    compiled_in = [h.clone().requires_grad_() for h in (h_pos, h_neg)]
    compiled = torch.compile(fn, fullgraph=True)(*compiled_in)
    for got, want in zip((compiled, *torch.autograd.grad(compiled, compiled_in)), (eager, *eager_grads)):
        assert_close(got, want, torch.float32, "compiled against eager")
    if device == "cpu":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = fn(h_pos, h_neg)
        assert mixed.dtype == torch.float32
        torch.testing.assert_close(mixed, eager.detach(), rtol=1e-5, atol=1e-6)
    leaf = h_pos.double().requires_grad_()
    (g,) = torch.autograd.grad(fn(leaf, h_neg.double()), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"ffkern: backend '{backend}' does not support double backward"):
        g.square().sum().backward()
    with pytest.raises(RuntimeError, match=rf"ffkern: backend '{backend}' does not support forward-mode AD"):
        with fwAD.dual_level():
            fn(fwAD.make_dual(h_pos, torch.ones_like(h_pos)), h_neg)


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_sffa_activity_on_channels_last_maps(backend, device):
    """A conv map [B, C, H, W] enters SFFA as channel tokens [B, H*W, C] (SPEC 2.1), a view in
    either layout; the means of the activity term are over all B*C*H*W values, as the authors'
    conv code takes them."""
    gen = torch.Generator().manual_seed(13)
    maps = [torch.rand(3, 6, 4, 5, generator=gen, dtype=torch.float64) * 0.3 for _ in range(2)]
    expected = None
    for layout in (torch.contiguous_format, torch.channels_last):
        hs = [m.to(device, copy=True).contiguous(memory_format=layout).detach().requires_grad_() for m in maps]
        loss = ffkern.sffa_loss(*[ffkern.channel_tokens(h) for h in hs], activity_term=True, backend=backend)
        loss.backward()
        if expected is None:
            ref = [m.clone().requires_grad_() for m in maps]
            expected = ffkern.sffa_loss(*[ffkern.channel_tokens(h) for h in ref], activity_term=True, backend="reference")
            expected.backward()
            a_ref = 1 + torch.exp(-10 * (maps[0].mean() + maps[1].mean()))
            assert expected.item() == pytest.approx(
                ffkern.sffa_loss(*[ffkern.channel_tokens(m) for m in maps], backend="reference").item() * a_ref.item(),
                rel=1e-12)
        assert_close(loss, expected, torch.float64, f"{layout} value")
        for h, r in zip(hs, ref):
            assert_close(h.grad, r.grad, torch.float64, f"{layout} grad")
