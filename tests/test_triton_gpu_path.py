"""The Triton backend as a GPU runs it, checked on the CPU.

- What the launchers hand to a GPU (recorded launches, kernels/_launch.py): no Python float
  arguments (compiled Triton passes them as fp32).
- The GPU tile configurations (kernels/marginal_supcon._tiles: interior, diagonal and tail tiles,
  the split-feature backward) run under the interpreter against the reference.
- Accuracy at sizes that matter: N=2048 fp16/bf16 gradients against float64 math on the same
  rounded inputs, a zero row in fp16, tau = 1e-3, D = 300 over several column tiles.
- The user's TF32 setting through either PyTorch API.
"""
import pytest
import torch

import ffkern
from ffkern import _backend

pytestmark = pytest.mark.skipif(not _backend.triton_importable(), reason="triton is not installed")

if _backend.triton_importable():
    from ffkern.kernels import _aot, _launch
    from ffkern.kernels import marginal_supcon as SC


def relative_error(got, expected):
    got, expected = got.detach().cpu().double(), expected.detach().cpu().double()
    return ((got - expected).abs().max() / expected.abs().max().clamp(min=1e-300)).item()


def reference_loss_and_grad(x, labels, **opts):
    """float64 math on the same (already rounded) input values."""
    xr = x.detach().cpu().double().requires_grad_()
    loss = ffkern.marginal_supcon_loss(xr, labels.cpu(), backend="reference", **opts)
    loss.backward()
    return loss.detach(), xr.grad


def triton_loss_and_grad(x, labels, **opts):
    xt = x.detach().clone().requires_grad_()
    loss = ffkern.marginal_supcon_loss(xt, labels, backend="triton", **opts)
    loss.backward()
    return loss.detach(), xt.grad


# ---------------------------------------------------------------- what a GPU launch receives

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_launches_pass_no_python_floats(dtype):
    """Compiled Triton specializes a Python float as fp32 (the interpreter keeps float64): the
    constants must travel in a tensor of the accumulation dtype instead."""
    launches = [*_aot.supcon_launches(dtype, 128, n=256), *_aot.supcon_launches(dtype, 128, n=256, temperature=0.01),
                *_aot.supcon_launches(dtype, 300, n=256), *_aot.ff_launches(dtype, batch=64, dim=64, loss="ff"),
                *_aot.ff_launches(dtype, batch=64, dim=64, loss="symba")]
    assert launches
    for launch in launches:
        floats = [name for name, arg in zip(launch.kernel.arg_names, launch.args) if isinstance(arg, float)]
        assert not floats, f"{launch.name} gets Python floats {floats}"
        if launch.name.startswith("_supcon"):
            labels = [arg for name, arg in zip(launch.kernel.arg_names, launch.args) if name in ("YR", "YC")]
            assert labels[0].dtype == labels[1].dtype, f"{launch.name}: labels of two dtypes"


def test_int64_labels_beyond_int32():
    """Labels are compared as given: 2^40 and 2^40 + 1 differ, as they must."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([2**40, 5, 2**40 + 1, 5, -2**40, 2**40])
    got = ffkern.marginal_supcon_loss(x, labels, backend="triton", reduction="none", return_stats=True)
    ref = ffkern.marginal_supcon_loss(x, labels, backend="reference", reduction="none", return_stats=True)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    assert got[1].num_positives.tolist() == [1, 1, 0, 1, 0, 1]


# ---------------------------------------------------------------- the GPU tile configurations

GPU_CONFIG_CASES = [(dtype, dim) for dtype in (torch.float32, torch.float16, torch.bfloat16) for dim in (64, 128, 300)]
GPU_CONFIG_CASES += [(torch.float64, 64), (torch.float64, 128)]


@pytest.mark.parametrize("dtype,dim", GPU_CONFIG_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_gpu_tile_configs_match_reference(monkeypatch, dtype, dim):
    """The tiles a GPU launch uses (not the interpreter's own), run by the interpreter: 150 rows
    give interior, diagonal and ragged tiles at BLOCK 64/32, and the split-feature backward."""
    def gpu_config(dim_, dtype_, kernel="fwd"):
        block_m, block_n, _warps, single, block_d, block_do = SC._tiles(dim_, dtype_, kernel, "ieee")
        cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single, EVEN_D=dim_ % block_d == 0,
                   UPCAST=dtype_ in (torch.bfloat16, torch.float16))
        if kernel == "bwd":
            cfg["BLOCK_DO"] = block_do
        return cfg, 1

    monkeypatch.setattr(SC, "_config", gpu_config)
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(150, dim, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 5, (150,), generator=gen)
    opts = dict(temperature=0.15, margin=0.4)
    loss, grad = triton_loss_and_grad(x, labels, **opts)
    ref_loss, ref_grad = reference_loss_and_grad(x, labels, **opts)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert relative_error(loss, ref_loss) < tol
    assert relative_error(grad, ref_grad) < tol


# ---------------------------------------------------------------- accuracy at sizes that matter

@pytest.mark.parametrize("dtype,bound", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
def test_half_precision_gradients_at_n2048(dtype, bound):
    """G ~ 1/(N^2 tau) underflows fp16 unless scaled before rounding (17% of the pair weights were
    flushed at N=4096): the gradient must stay within the bound of the input precision."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 10, (2048,), generator=gen)
    loss, grad = triton_loss_and_grad(x, labels, margin=0.4)
    ref_loss, ref_grad = reference_loss_and_grad(x, labels, margin=0.4)
    assert relative_error(loss, ref_loss) < bound
    err = relative_error(grad, ref_grad)
    assert err < bound, f"{dtype} gradient relative error {err:.3g} >= {bound}"


def test_fp16_zero_row_keeps_other_gradients_finite():
    """A zero row has r = 1/eps = 1e12, which overflows fp16: its own gradient is that large (as in
    the reference), but it must not turn every other row's gradient into NaN."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 64, generator=gen, dtype=torch.float64).to(torch.float16)
    x[17] = 0.0
    labels = torch.randint(0, 4, (300,), generator=gen)
    loss, grad = triton_loss_and_grad(x, labels, margin=0.4)
    ref_loss, ref_grad = reference_loss_and_grad(x, labels, margin=0.4)
    others = torch.ones(300, dtype=torch.bool)
    others[17] = False
    assert torch.isfinite(loss) and torch.isfinite(grad[others]).all()
    assert relative_error(grad[others], ref_grad[others]) < 5e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_small_temperature(dtype):
    """tau = 1e-3: K = log2(e)/tau is far beyond the bounded regime; the online path must hold."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 32, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 3, (200,), generator=gen)
    assert not SC.is_bounded(1e-3, True) and SC.is_bounded(0.15, True)
    loss, grad = triton_loss_and_grad(x, labels, temperature=1e-3, margin=0.4)
    ref_loss, ref_grad = reference_loss_and_grad(x, labels, temperature=1e-3, margin=0.4)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    tol = 1e-9 if dtype == torch.float64 else 2e-4  # fp32 s rounding times 1/tau = 1000
    assert relative_error(loss, ref_loss) < tol
    assert relative_error(grad, ref_grad) < tol


def test_wide_features_over_many_column_tiles():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 300, generator=gen, dtype=torch.float64).to(torch.float32)
    labels = torch.randint(0, 6, (200,), generator=gen)
    loss, grad = triton_loss_and_grad(x, labels, margin=0.3, reduction="sum")
    ref_loss, ref_grad = reference_loss_and_grad(x, labels, margin=0.3, reduction="sum")
    assert relative_error(loss, ref_loss) < 2e-5
    assert relative_error(grad, ref_grad) < 2e-5


# ---------------------------------------------------------------- the user's TF32 setting

def test_tf32_setting_through_the_new_api():
    """torch.get_float32_matmul_precision() raises once torch.backends.cuda.matmul.fp32_precision
    has been set; ffkern reads whichever API the user set."""
    old = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert _launch.fp32_matmul_precision() == "high"
        assert _launch.dot_precision(torch.float32) == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert _launch.fp32_matmul_precision() == "highest"
        x = torch.randn(8, 2, 4)
        ffkern.marginal_supcon_loss(x, torch.arange(8) % 3, backend="triton")  # must not raise
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    assert _launch.dot_precision(torch.bfloat16) == "ieee"


def test_tf32_setting_through_the_legacy_api():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert _launch.dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert _launch.fp32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(old)


# ---------------------------------------------------------------- the split column sweep (small N)

@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("dtype,dim", [(torch.float64, 40), (torch.float32, 300), (torch.bfloat16, 64)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_split_sweep_matches_reference(monkeypatch, splits, dtype, dim):
    """Small batches split the column sweep across programs (flash-decoding style) and combine
    the partial row statistics (forward) and partial gradients (backward)."""
    monkeypatch.setattr(SC, "_force_splits", splits)
    gen = torch.Generator().manual_seed(splits)
    x = torch.randn(150, dim, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 5, (150,), generator=gen)
    opts = dict(temperature=0.2, margin=0.4, reduction="none", return_stats=True)
    xt = x.clone().requires_grad_()
    (loss, stats) = ffkern.marginal_supcon_loss(xt, labels, backend="triton", **opts)
    xr = x.double().requires_grad_()
    (ref, ref_stats) = ffkern.marginal_supcon_loss(xr, labels, backend="reference", **opts)
    weights = torch.rand(150, generator=gen, dtype=torch.float64)
    (loss * weights.to(loss.dtype)).sum().backward()
    (ref * weights).sum().backward()
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    assert relative_error(loss, ref) < tol
    assert relative_error(xt.grad, xr.grad) < tol
    assert torch.equal(stats.num_positives, ref_stats.num_positives)


def test_split_sweep_with_row_offset(monkeypatch):
    """The distributed primitives (anchors = rows 40..99 of all rows) under a split sweep."""
    monkeypatch.setattr(SC, "_force_splits", 3)
    from ffkern import reference
    gen = torch.Generator().manual_seed(9)
    z = torch.nn.functional.normalize(torch.randn(130, 24, generator=gen, dtype=torch.float64), dim=1)
    y = torch.randint(0, 4, (130,), generator=gen)
    zr, yr = z[40:100], y[40:100]
    got = SC.supcon_forward(zr, yr, z, y, 40, 0.15, 0.3)
    ref = reference.supcon_forward(zr, yr, z, y, 40, 0.15, 0.3)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    full = reference.supcon_forward(z, y, z, y, 0, 0.15, 0.3)
    a_c = torch.rand(130, generator=gen, dtype=torch.float64) * (full[2] > 0)
    b_c = a_c / full[2].clamp(min=1)
    args = (zr, yr, z, y, 40, full[1][40:100], a_c[40:100], b_c[40:100], full[1], a_c, b_c, 0.15, 0.3)
    torch.testing.assert_close(SC.supcon_backward(*args), reference.supcon_backward(*args), rtol=1e-10, atol=1e-12)
