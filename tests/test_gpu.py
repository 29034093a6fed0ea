"""The GPU suite: what only means something on a CUDA device, through the public functions of the
fused backends ("triton" and "cpp").

  - values and gradients at scale (N ~ 16k) in every dtype and D in {64, 128, 256, 300}, against a
    float64 reference computed in anchor chunks on the GPU (never an N x N float64 matrix of the
    whole batch), on the same rounded inputs;
  - the distributed primitives (a slice of anchors, row_offset != 0, against all rows);
  - 64-bit offsets: N^2 > 2^31 pair indices and N*D > 2^31 element offsets;
  - bitwise determinism, tensors on a device that is not the current one, a zero row in fp16,
    tau = 1e-3, TF32 through both fp32-precision APIs, the FF losses at B*D = 2^24;
  - the cpp extension must have been built with its CUDA kernels (a failed build fails here).
Everything skips, with the reason shown, where CUDA is not available. Sized to run in about two
minutes on one H200, Triton compilation included and the extension build not (an estimate: the
file has not run on a GPU yet). The slow tests, marked, hold tens of GB of GPU memory each and
share one pytest-xdist group; benchmarks/gpu_check.sh runs the file with 4 workers.
"""
import contextlib
import gc
import zlib

import pytest
import torch

import ffkern
from ffkern import _backend, reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]

FUSED = [b for b in _backend.BACKENDS if b != "reference"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-12  # the eps of SPEC 1.2 step 1 (F.normalize's clamp)
TAU, MARGIN = 0.15, 0.1  # CFF's temperature and its last-layer margin (see clustered_features)

# Largest error allowed, relative to the largest magnitude of the float64 reference (gradients of
# a large batch are small numbers, so an absolute floor would make the check vacuous). Losses are
# float32 math even for half inputs, but the cpp backend rounds the normalized rows to the input
# dtype before its products (~3e-4 of the loss in bf16, ~4e-5 in fp16); gradients are rounded to
# the input dtype, and in the Triton backward the pair term G is a half-precision tensor-core
# operand (~3e-3 in bf16, ~4e-4 in fp16 when emulated in PyTorch on these inputs).
LOSS_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 5e-3}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CHUNK_PAIRS = 1 << 25  # anchors per reference chunk x all rows: ~270 MB per float64 matrix


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """Hands cached blocks back after every test: the large tests need tens of GB each, and a
    pytest-xdist worker would otherwise keep what its last test cached."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|, in float64 (NaN or inf in actual: inf or NaN,
    which fails every `<=` check)."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().clamp(min=torch.finfo(torch.float64).tiny)
    return ((a - e).abs().max() / scale).item()


def assert_rel(actual, expected, tol, what):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: error {err:.3g} (relative to the largest reference magnitude) > {tol:.3g}"


def clustered_features(n, d, dtype, device, seed, classes=64, duplicate_every=16, signal=0.65):
    """Rows x = signal * prototype[y] + noise (rounded to ``dtype``) and labels y.

    Same-class pairs then have s ~ signal^2 / (1 + signal^2) = 0.30 and other pairs s ~ 0, both with
    a spread of about 1 / sqrt(D), so a backend that reads the wrong rows gets visibly wrong values.
    Every ``duplicate_every``-th row is followed by a near-copy of the same class (s ~ 0.996): a
    clipped positive for MARGIN = 0.1. The clip boundary s = 1 - MARGIN = 0.9 is then more than
    5 spreads from every other pair at D >= 64, so no rounding to fp16/bf16 moves a pair across it
    and the float64 reference clips exactly the pairs the backend clips.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen, device=device)
    protos = torch.randn(classes, d, generator=gen, device=device, dtype=torch.float64)
    x = signal * protos[labels] + torch.randn(n, d, generator=gen, device=device, dtype=torch.float64)
    first = torch.arange(0, n - 1, duplicate_every, device=device)
    x[first + 1] = x[first] + 0.1 * torch.randn(len(first), d, generator=gen, device=device, dtype=torch.float64)
    labels[first + 1] = labels[first]
    return x.to(dtype), labels


def upstream_weights(n, dtype, device, seed):
    """A per-anchor upstream gradient in [0.5, 1.5): reduction "none" with these weights covers any
    g_i of SPEC 1.3. (O(1), as under a gradient scaler: with "mean" at N = 16k, fp16 gradients are
    ~1e-7 and mostly subnormal, whatever the backend.)"""
    gen = torch.Generator(device=device).manual_seed(seed)
    return 0.5 + torch.rand(n, generator=gen, device=device, dtype=dtype)


def chunked_reference_forward(z, labels, temperature, margin, chunk=None):
    """reference.supcon_forward of every row in anchor chunks: (L, lse, |P|, clipped), each [N].
    The same formula as the whole-batch reference; the largest matrix is chunk x N."""
    n = z.shape[0]
    chunk = chunk or max(1, CHUNK_PAIRS // n)
    outs = [reference.supcon_forward(z[i:i + chunk], labels[i:i + chunk], z, labels, i, temperature, margin)
            for i in range(0, n, chunk)]
    return [torch.cat(parts) for parts in zip(*outs)]


def coefficients(weights, num_pos, temperature):
    """a_i = g_i w_i / tau, b_i = a_i / |P(i)| (SPEC 1.3), written out here rather than taken from
    the package, so the reference shares no code with the backends' autograd."""
    a = torch.where(num_pos > 0, weights / temperature, torch.zeros_like(weights))
    return a, a / num_pos.clamp(min=1).to(a.dtype)


def chunked_reference_backward(z, labels, lse, a, b, temperature, margin, chunk=None):
    """dL/dz of every row by reference.supcon_backward, in anchor chunks."""
    n = z.shape[0]
    chunk = chunk or max(1, CHUNK_PAIRS // n)
    return torch.cat([reference.supcon_backward(z[i:i + chunk], labels[i:i + chunk], z, labels, i, lse[i:i + chunk],
                                                a[i:i + chunk], b[i:i + chunk], lse, a, b, temperature, margin)
                      for i in range(0, n, chunk)])


def reference_supcon(x, labels, weights, temperature, margin):
    """Float64 reference of the public loss with reduction="none": per-anchor L, |P|, clipped
    counts, and dL/dx of sum_i weights_i L_i. x is taken as it is (already rounded to the backend's
    dtype), so both sides see the same input values."""
    x = x.double()
    norm = torch.linalg.vector_norm(x, dim=1)
    z = x / norm.clamp(min=EPS)[:, None]
    loss, lse, num_pos, num_clipped = chunked_reference_forward(z, labels, temperature, margin)
    a, b = coefficients(weights.double(), num_pos, temperature)
    dz = chunked_reference_backward(z, labels, lse, a, b, temperature, margin)
    # through z = x / max(||x||, eps) (SPEC 1.3): projected where ||x|| > eps, the plain 1/eps
    # scale of the clamp below it
    along = (z * dz).sum(1, keepdim=True)
    dx = torch.where((norm > EPS)[:, None], (dz - z * along) / norm.clamp(min=EPS)[:, None], dz / EPS)
    return loss, num_pos, num_clipped, dx


def public_supcon(x, labels, weights, backend, temperature=TAU, margin=MARGIN):
    """The public loss with reduction="none", backward of sum_i weights_i L_i: (L, stats, dL/dx)."""
    xg = x.detach().clone().requires_grad_()
    loss, stats = ffkern.marginal_supcon_loss(xg, labels, temperature=temperature, margin=margin, reduction="none",
                                              backend=backend, return_stats=True)
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach(), stats, xg.grad


@contextlib.contextmanager
def fp32_precision_restored():
    """Restores both fp32-matmul settings, the legacy one and torch.backends.cuda.matmul.fp32_precision.
    torch.get_float32_matmul_precision() raises while the two disagree, so a test that sets the
    new one must leave it as it found it."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    new = torch.backends.cuda.matmul.fp32_precision
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        torch.backends.cuda.matmul.fp32_precision = new


# ------------------------------------------------------------------------------------- the build

def test_cpp_extension_has_cuda_kernels():
    """On a GPU machine the cpp extension must build with its CUDA kernels: a failed build is a
    failure here, not a skip (conftest keeps the cpp-cuda conformance cases unskipped too)."""
    reason = _backend._instance("cpp").unavailable_reason(torch.device("cuda"))
    assert reason is None, f"backend 'cpp' cannot run on CUDA tensors: {reason}"


def test_auto_picks_a_fused_backend_on_cuda():
    assert _backend.resolve("auto", torch.device("cuda")).name != "reference"


# ----------------------------------------------------------------- marginal SupCon at scale

@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("dim", [64, 128, 256, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", FUSED)
def test_supcon_gradients_at_scale(backend, dtype, dim):
    # not a multiple of any tile size: partial tiles on both sides of every sweep
    n = 8191 if dtype == torch.float64 else 16381
    x, labels = clustered_features(n, dim, dtype, "cuda", seed=dim)
    weights = upstream_weights(n, torch.float64, "cuda", seed=dim + 1)
    loss, stats, grad = public_supcon(x, labels, weights, backend)
    ref_loss, ref_pos, ref_clipped, ref_grad = reference_supcon(x, labels, weights, TAU, MARGIN)

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_rel(loss, ref_loss, LOSS_TOL[dtype], "per-anchor loss")
    assert_rel(grad, ref_grad, GRAD_TOL[dtype], "dL/dx")
    assert torch.equal(stats.num_positives.cpu().long(), ref_pos.cpu().long())
    # exact in every dtype: no pair lies near the clip boundary (clustered_features)
    assert torch.equal(stats.num_clipped.cpu().long(), ref_clipped.cpu().long())
    assert ref_clipped.sum() > n // 16  # the near-copies: the clipped branch really runs


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("dim", [128, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", FUSED)
def test_distributed_primitives_with_row_offset(backend, dtype, dim):
    """supcon_forward / supcon_backward of a slice of anchors (global rows row_offset..) against all
    rows, as the distributed loss calls them: normalized rows in the operand dtype, statistics in
    float32 (float64 for float64 rows), dz in float32."""
    n_all = 12000
    x, labels = clustered_features(n_all, dim, torch.float64, "cuda", seed=7 * dim)
    z = torch.nn.functional.normalize(x, dim=1).to(dtype)  # what every rank passes
    z64 = z.double()
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = upstream_weights(n_all, torch.float64, "cuda", seed=3)
    ref_loss, ref_lse, ref_pos, ref_clipped = chunked_reference_forward(z64, labels, TAU, MARGIN)
    ref_a, ref_b = coefficients(weights, ref_pos, TAU)
    impl = _backend.resolve(backend, z.device)

    # one slice that starts inside a tile, one that ends at the last row
    for start, stop in [(5000, 8000), (n_all - 777, n_all)]:
        zr, yr = z[start:stop].clone(), labels[start:stop].clone()  # a rank's own tensors
        loss, lse, num_pos, num_clipped = impl.supcon_forward(zr, yr, z, labels, start, TAU, MARGIN)
        what = f"rows {start}..{stop - 1}"
        assert_rel(loss, ref_loss[start:stop], LOSS_TOL[dtype], f"{what}: loss")
        assert_rel(lse, ref_lse[start:stop], LOSS_TOL[dtype], f"{what}: lse")
        assert torch.equal(num_pos.long(), ref_pos[start:stop].long())
        assert torch.equal(num_clipped.long(), ref_clipped[start:stop].long())

        # backward from the reference's statistics, so it is checked on its own
        stats = [t.to(stat_dtype) for t in (ref_lse, ref_a, ref_b)]
        dz = impl.supcon_backward(zr, yr, z, labels, start, *(t[start:stop] for t in stats), *stats, TAU, MARGIN)
        ref_dz = reference.supcon_backward(z64[start:stop], yr, z64, labels, start, ref_lse[start:stop],
                                           ref_a[start:stop], ref_b[start:stop], ref_lse, ref_a, ref_b, TAU, MARGIN)
        assert dz.dtype == stat_dtype and dz.shape == zr.shape
        assert_rel(dz, ref_dz, GRAD_TOL[dtype], f"{what}: dz")


@pytest.mark.slow
@pytest.mark.xdist_group("large-memory")
@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("backend", FUSED)
def test_large_batch_matches_chunked_reference(backend, dtype):
    """N = 50000: N^2 = 2.5e9 > 2^31 pairs, so any 32-bit pair index overflows. Forward and
    backward through the public path, against the float64 reference in chunks (~16 GB of float64
    temporaries at a time)."""
    n, d = 50_000, 128
    x, labels = clustered_features(n, d, dtype, "cuda", seed=11, classes=100)
    weights = upstream_weights(n, torch.float64, "cuda", seed=12)
    loss, stats, grad = public_supcon(x, labels, weights, backend)
    ref_loss, ref_pos, ref_clipped, ref_grad = reference_supcon(x, labels, weights, TAU, MARGIN)
    assert_rel(loss, ref_loss, LOSS_TOL[dtype], "per-anchor loss")
    assert_rel(grad, ref_grad, GRAD_TOL[dtype], "dL/dx")
    assert torch.equal(stats.num_positives.cpu().long(), ref_pos.cpu().long())
    assert torch.equal(stats.num_clipped.cpu().long(), ref_clipped.cpu().long())


@pytest.mark.slow
@pytest.mark.xdist_group("large-memory")
@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("backend", FUSED)
def test_element_offsets_beyond_2_31(backend):
    """N * D = 3.2e9 > 2^31 elements: rows from 4096 on start past element 2^31, so a 32-bit
    row * stride wraps, in the anchors' loads (forward and backward over all rows) and in the
    column sweeps. The feature width is what makes N * D large, not N: the work of one sweep is
    N * D per program whatever the split, and a wide D keeps N^2 * D, the total work, at ~4e13
    flops (a second or two per backend), where D = 128 would need N = 25M rows (N^2 * D = 8e16).

    bfloat16 rows: 6.4 GB, dz in float32 12.9 GB, and the float32 reference's copy of all rows
    12.9 GB. The reference is float32 (products of bf16 values are exact in it; TF32 off) in anchor
    chunks, computed for every row; backward is compared on every row too."""
    n, d = 6144, 1 << 19
    assert n * d > 1.4 * 2 ** 31 and 4096 * d == 2 ** 31
    gen = torch.Generator(device="cuda").manual_seed(13)
    labels = torch.randint(0, 16, (n,), generator=gen, device="cuda")
    protos = torch.randn(16, d, generator=gen, device="cuda")
    z = torch.empty(n, d, dtype=torch.bfloat16, device="cuda")
    for i in range(0, n, 512):  # same structure as clustered_features, built in slices
        rows = protos[labels[i:i + 512]] + torch.randn(len(labels[i:i + 512]), d, generator=gen, device="cuda")
        z[i:i + 512] = torch.nn.functional.normalize(rows, dim=1).to(torch.bfloat16)
    del protos, rows
    weights = upstream_weights(n, torch.float32, "cuda", seed=14)
    margin = 0.3  # positives s ~ 0.5 +- 0.002: s + m ~ 0.8, far from the clip at 1

    impl = _backend.resolve(backend, z.device)
    loss, lse, num_pos, num_clipped = impl.supcon_forward(z, labels, z, labels, 0, TAU, margin)
    a, b = coefficients(weights, num_pos, TAU)
    dz = impl.supcon_backward(z, labels, z, labels, 0, lse, a, b, lse, a, b, TAU, margin)
    torch.cuda.synchronize()

    ref_loss, ref_lse, ref_pos, ref_clipped = chunked_reference_forward(z, labels, TAU, margin, chunk=2048)
    assert_rel(loss, ref_loss, 1e-4, "loss")
    assert_rel(lse, ref_lse, 1e-4, "lse")
    assert torch.equal(num_pos.long(), ref_pos.long())
    assert torch.equal(num_clipped.long(), ref_clipped.long())
    assert (ref_pos > 0).all() and ref_loss[4096:].abs().min() > 0  # rows past 2^31 carry a loss

    ref_a, ref_b = coefficients(weights, ref_pos, TAU)
    worst, scale = 0.0, 0.0
    for i in range(0, n, 1024):
        ref = reference.supcon_backward(z[i:i + 1024], labels[i:i + 1024], z, labels, i, ref_lse[i:i + 1024],
                                        ref_a[i:i + 1024], ref_b[i:i + 1024], ref_lse, ref_a, ref_b, TAU, margin)
        worst = max(worst, (dz[i:i + 1024] - ref).abs().max().item())  # float32: 4 GB less than float64
        scale = max(scale, ref.abs().max().item())
        del ref
    assert worst <= 3e-2 * scale, f"dz: max error {worst:.3g} > 3e-2 * {scale:.3g}"


# ------------------------------------------------------------------- behaviour at scale

@pytest.mark.parametrize("dtype,dim", [(torch.float32, 128), (torch.bfloat16, 128), (torch.bfloat16, 300)],
                         ids=["float32-128", "bfloat16-128", "bfloat16-300"])
@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic(backend, dtype, dim):
    """No atomics anywhere: two runs give the same bits, loss, statistics and gradients (D = 300 is
    the path that accumulates dz in memory feature block by feature block)."""
    x, labels = clustered_features(8191, dim, dtype, "cuda", seed=21)
    weights = upstream_weights(8191, torch.float32, "cuda", seed=22)
    first, second = (public_supcon(x, labels, weights, backend) for _ in range(2))
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1].num_clipped, second[1].num_clipped)
    assert torch.equal(first[2], second[2])
    h = torch.randn(4096, 1024, device="cuda", dtype=dtype, generator=torch.Generator(device="cuda").manual_seed(23))
    ff = []
    for _ in range(2):
        hp, hn = h.clone().requires_grad_(), (0.5 * h).requires_grad_()
        loss = ffkern.symba_loss(hp, hn, backend=backend)
        loss.backward()
        ff.append((loss.detach(), hp.grad, hn.grad))
    assert all(torch.equal(u, v) for u, v in zip(*ff))


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"needs two CUDA devices (found {torch.cuda.device_count()})")
@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("backend", FUSED)
def test_tensors_on_a_device_that_is_not_current(backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on the tensors' device
    (a launch on the current one reads foreign pointers: an error or garbage)."""
    x0, labels0 = clustered_features(4099, 128, torch.float32, "cuda:0", seed=31)
    w0 = upstream_weights(4099, torch.float32, "cuda:0", seed=32)
    h0 = torch.randn(512, 3, 64, device="cuda:0", generator=torch.Generator(device="cuda:0").manual_seed(33))
    with torch.cuda.device(0):
        results = []
        for device in ("cuda:0", "cuda:1"):
            x, labels, w, h = (t.to(device) for t in (x0, labels0, w0, h0))
            loss, _, grad = public_supcon(x, labels, w, backend)
            hp, hn = h.clone().requires_grad_(), (0.7 * h).requires_grad_()
            ff = ffkern.sffa_loss(hp, hn, skip_tokens=1, backend=backend) + ffkern.ff_loss(hp, hn, backend=backend)
            ff.backward()
            assert loss.device == grad.device == ff.device == hp.grad.device == torch.device(device)
            results.append([t.detach().to("cuda:0") for t in (loss, grad, ff, hp.grad, hn.grad)])
        assert torch.cuda.current_device() == 0
    for name, ours, theirs in zip(["loss", "dL/dx", "ff loss", "ff dh+", "ff dh-"], *results):
        assert_rel(theirs, ours, 1e-6, f"{name} on cuda:1 vs cuda:0")


@pytest.mark.parametrize("backend", FUSED)
def test_zero_row_in_fp16(backend):
    """A zero feature row in fp16: z = 0 there (the eps clamp), every loss and every other row's
    gradient finite and as the reference, and no NaN anywhere. The zero row's own gradient is
    dL/dz / eps (SPEC 1.3, as F.normalize), about 1e10 here, which fp16 cannot hold: it is +-inf,
    with the reference's sign, in every backend including the reference itself."""
    n, zero = 4101, 17
    x, labels = clustered_features(n, 128, torch.float16, "cuda", seed=41)
    x[zero] = 0.0
    weights = upstream_weights(n, torch.float32, "cuda", seed=42)
    loss, _, grad = public_supcon(x, labels, weights, backend)
    ref_loss, _, _, ref_grad = reference_supcon(x, labels, weights, TAU, MARGIN)
    assert torch.isfinite(loss).all()
    assert_rel(loss, ref_loss, LOSS_TOL[torch.float16], "per-anchor loss")
    assert not torch.isnan(grad).any()
    others = torch.arange(n, device="cuda") != zero
    assert torch.isfinite(grad[others]).all()
    assert_rel(grad[others], ref_grad[others], GRAD_TOL[torch.float16], "dL/dx of the other rows")
    # components well above the rounding error of dL/dz (a few 1e-3 of the row's largest) are
    # past fp16's range and have a definite sign; the smallest may go either way
    ref_row = ref_grad[zero]
    sure = ref_row.abs() > max(0.05 * ref_row.abs().max().item(), 2 * torch.finfo(torch.float16).max)
    assert sure.sum() > 64
    assert torch.equal(grad[zero][sure].double(), ref_row[sure].sign() * float("inf"))


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("backend", FUSED)
def test_tiny_temperature_fp32(backend):
    """tau = 1e-3: logits up to 1000, exp() only through the online max; the result is finite and
    as the reference. A similarity error e moves p by e / tau relative, so the gradient bound is
    looser than at tau = 0.15."""
    n, tau = 4099, 1e-3
    x, labels = clustered_features(n, 128, torch.float32, "cuda", seed=51)
    weights = upstream_weights(n, torch.float32, "cuda", seed=52)
    loss, _, grad = public_supcon(x, labels, weights, backend, temperature=tau)
    ref_loss, _, _, ref_grad = reference_supcon(x, labels, weights, tau, MARGIN)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_rel(loss, ref_loss, 1e-5, "per-anchor loss")
    assert_rel(grad, ref_grad, 2e-3, "dL/dx")


# --------------------------------------------------------------------------------- TF32

@pytest.mark.parametrize("backend", FUSED)
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


@pytest.mark.parametrize("backend", FUSED)
def test_tf32_through_the_new_precision_api(backend):
    """torch.backends.cuda.matmul.fp32_precision ("ieee" / "tf32", PyTorch >= 2.9): setting it must
    not make the loss raise (the legacy getter raises once the two APIs disagree); "ieee" gives the
    same bits as the legacy "highest", "tf32" stays close to it."""
    x, labels = clustered_features(2048, 128, torch.float32, "cuda", seed=61)
    weights = upstream_weights(2048, torch.float32, "cuda", seed=62)

    def run():
        loss, _, grad = public_supcon(x, labels, weights, backend)
        return loss, grad

    with fp32_precision_restored():
        torch.set_float32_matmul_precision("highest")
        legacy_ieee = run()
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        ieee = run()
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        tf32 = run()
    assert torch.equal(ieee[0], legacy_ieee[0]) and torch.equal(ieee[1], legacy_ieee[1])
    assert_rel(tf32[0], ieee[0], 5e-3, "loss under tf32")
    assert_rel(tf32[1], ieee[1], 5e-2, "dL/dx under tf32")


# ------------------------------------------------------------- FF goodness losses at scale

FF_SHAPES = [(16384, 1024), (1024, 16, 1024)]  # B * D = 2^24, and B * T * D = 2^24 with a label token
FF_CASES = [("ff", "mean"), ("symba", "mean"), ("sffa", "mean"), ("goodness", "mean"), ("goodness", "sum")]
# a float32 reduction over 2^15 samples may be summed in any order: sqrt(n) * eps ~ 1e-5 each way
FF_LOSS_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3}
FF_GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("loss,kind", FF_CASES, ids=[f"{a}-{b}" for a, b in FF_CASES])
@pytest.mark.parametrize("shape", FF_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", FUSED)
def test_ff_losses_at_scale(backend, shape, loss, kind, dtype):
    """FF / SymBa / SFFA and the goodness at 2^24 elements, values and gradients against the
    float64 reference on the same rounded values. (No fp16: the gradients, ~1 / (B * D), would be
    subnormal there.)"""
    skip = 1 if len(shape) == 3 else 0
    tokens = shape[1] - skip if len(shape) == 3 else 1
    # goodness near the threshold 2 (kind "mean"), so both softplus branches carry weight; the
    # token mean shrinks the variance by the number of tokens
    scale = (2.0 * tokens) ** 0.5 if kind == "mean" else (2.0 * tokens / shape[-1]) ** 0.5
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{shape}-{loss}-{kind}".encode()))
    leaves = [(torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype) for _ in range(2)]
    ours = [t.clone().requires_grad_() for t in leaves]
    ref = [t.double().requires_grad_() for t in leaves]

    def run(h, backend):
        if loss == "goodness":
            return ffkern.ff_goodness(h[0], kind=kind, skip_tokens=skip, backend=backend)
        fn = {"ff": ffkern.ff_loss, "symba": ffkern.symba_loss, "sffa": ffkern.sffa_loss}[loss]
        return fn(h[0], h[1], kind=kind, skip_tokens=skip, backend=backend)

    expected, got = run(ref, "reference"), run(ours, backend)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert_rel(got, expected, FF_LOSS_TOL[dtype], f"{loss} value")
    weights = upstream_weights(expected.numel(), torch.float64, "cuda", seed=71).reshape(expected.shape)
    (expected * weights).sum().backward()
    (got * weights.to(got.dtype)).sum().backward()
    for i, (a, b) in enumerate(zip(ours, ref)):
        if b.grad is None:  # goodness of h[0] only
            assert a.grad is None or not a.grad.any()
            continue
        assert a.grad.dtype == dtype
        assert_rel(a.grad, b.grad, FF_GRAD_TOL[dtype], f"{loss} gradient of input {i}")
