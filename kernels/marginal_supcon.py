"""Fused Triton kernels of the marginal supervised contrastive loss (SPEC 1), and their launchers.

Both kernels tile the similarity matrix s = z z^T into [BLOCK_M x BLOCK_N] tiles and never store it:
  forward   one program owns BLOCK_M anchors and sweeps all column tiles with an online logsumexp
            (FlashAttention style), writing per anchor L_i, lse_i, |P(i)| and the clipped count.
  backward  one program owns BLOCK_M rows k and sweeps all column tiles j, recomputing s from z and
            forming the symmetric pair term of SPEC 1.3,
                dz_k = sum_{j != k} (G_kj + G_jk) z_j,  G_ij = kappa_ij (a_i p_ij - b_i M_ij),
            which needs only per-row statistics (lse, a, b) of both k and j: no atomics, no N x N
            buffer, O(N*D) memory.
Anchors (rows, "r") are a contiguous slice of all rows ("c") starting at global index row_offset;
single-process use passes the same tensor for both (row_offset 0), the distributed loss passes
the local rows against the gathered global batch.

Normalization can be fused (SCALED): the kernels then read the raw features x in their own dtype
and only the row norms, with z_i = r_i x_i, r_i = 1 / max(||x_i||, eps):
  s_ij = r_i r_j (x_i . x_j),   dz_k = sum_j (G_kj + G_jk) r_j x_j,
  dL/dx_k = r_k (dz_k - z_k (z_k . dz_k))    (no projection where ||x_k|| <= eps: there z = x / eps),
so no normalized copy of the features is stored and dL/dx is written in the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ffkern._supcon_function import backward_coefficients

from ._launch import dot_precision, is_interpreter


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: the interpreter's numpy matmul cannot read bfloat16, so there the
    operands are widened to fp32 first (exact: bf16 products are exact in fp32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _inverse_norm(NORM, idx, mask):
    """r = 1 / max(||x||, eps) with eps = 1e-12, as F.normalize."""
    return 1.0 / tl.maximum(tl.load(NORM + idx, mask=mask, other=1.0), 1e-12)


@triton.jit
def _similarity_tile(z_i, ZC, cols, cmask, rows, rmask, ZR, stride_r, stride_c, dim, dk, NORM_C, r_i,
                     ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                     UPCAST: tl.constexpr, SCALED: tl.constexpr):
    """s_ij = z_i . z_j for a tile (SCALED: s_ij = r_i r_j (x_i . x_j)); returns (s, z_j, r_j).
    z_j [BLOCK_N, BLOCK_D] is only loaded whole when SINGLE_D (the feature dimension fits one
    block), so backward can reuse it; r_j is 1 unless SCALED."""
    if SINGLE_D:
        z_j = tl.load(ZC + cols[:, None] * stride_c + dk[None, :], mask=cmask[:, None] & (dk[None, :] < dim), other=0.0)
        s = _dot(z_i, tl.trans(z_j), tl.zeros([BLOCK_M, BLOCK_N], ACC), PRECISION, UPCAST)
    else:
        z_j = tl.zeros([BLOCK_N, BLOCK_D], ZC.dtype.element_ty)  # unused
        s = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + dk
            a = tl.load(ZR + rows[:, None] * stride_r + d[None, :], mask=rmask[:, None] & (d[None, :] < dim), other=0.0)
            b = tl.load(ZC + cols[None, :] * stride_c + d[:, None], mask=cmask[None, :] & (d[:, None] < dim), other=0.0)
            s = _dot(a, b, s, PRECISION, UPCAST)
    if SCALED:
        r_j = _inverse_norm(NORM_C, cols, cmask)
        s = s * r_i[:, None] * r_j[None, :]
    else:
        r_j = tl.full([BLOCK_N], 1.0, ACC)  # unused
    return s, z_j, r_j


@triton.jit
def _anchor_block(ZR, YR, n_rows, dim, stride_r, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  SINGLE_D: tl.constexpr):
    """This program's BLOCK_M rows: indices (64-bit), mask, labels and, when the feature
    dimension fits one block, their z (kept for the whole sweep)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    dk = tl.arange(0, BLOCK_D)
    y = tl.load(YR + rows, mask=rmask, other=0)
    if SINGLE_D:
        z = tl.load(ZR + rows[:, None] * stride_r + dk[None, :], mask=rmask[:, None] & (dk[None, :] < dim), other=0.0)
    else:
        z = tl.zeros([BLOCK_M, BLOCK_D], ZR.dtype.element_ty)  # unused: loaded chunk by chunk
    return rows, rmask, dk, y, z


@triton.jit
def _margined_logits(s, rows_global, rmask, y_i, cols, cmask, y_j, inv_tau, margin):
    """SPEC 1.2 on a tile: valid pairs (j != i, in range), positives M_ij, and
    l_ij = t_ij / tau with t_ij = min(s_ij + m, 1) for positives, s_ij otherwise."""
    valid = rmask[:, None] & cmask[None, :] & (rows_global[:, None] != cols[None, :])
    pos = valid & (y_i[:, None] == y_j[None, :])
    logits = tl.where(pos, tl.minimum(s + margin, 1.0), s) * inv_tau
    return valid, pos, logits


@triton.jit
def _supcon_fwd_kernel(ZR, ZC, YR, YC, NORM_R, NORM_C, LOSS, LSE, NPOS, NCLIP,
                       n_rows, n_cols, dim, row_offset, stride_r, stride_c, inv_tau, margin,
                       ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                       UPCAST: tl.constexpr, SCALED: tl.constexpr):
    rows, rmask, dk, y_i, z_i = _anchor_block(ZR, YR, n_rows, dim, stride_r, BLOCK_M, BLOCK_D, SINGLE_D)
    row_global = rows + row_offset
    r_i = _inverse_norm(NORM_R, rows, rmask) if SCALED else tl.full([BLOCK_M], 1.0, ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)  # running max of l_ij
    sum_exp = tl.zeros([BLOCK_M], ACC)  # sum_j exp(l_ij - m_i)
    pos_logits = tl.zeros([BLOCK_M], ACC)  # sum_{j in P(i)} l_ij
    num_pos = tl.zeros([BLOCK_M], tl.int32)
    num_clipped = tl.zeros([BLOCK_M], tl.int32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n_cols
        s, z_j, r_j = _similarity_tile(z_i, ZC, cols, cmask, rows, rmask, ZR, stride_r, stride_c, dim, dk, NORM_C,
                                       r_i, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, UPCAST, SCALED)
        y_j = tl.load(YC + cols, mask=cmask, other=0)
        valid, pos, logits = _margined_logits(s, row_global, rmask, y_i, cols, cmask, y_j, inv_tau, margin)
        logits = tl.where(valid, logits, float("-inf"))
        # online logsumexp; m_safe keeps exp() finite while a row has seen no valid column yet
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        sum_exp = sum_exp * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), 1)
        m_i = m_new
        pos_logits += tl.sum(tl.where(pos, logits, 0.0), 1)
        num_pos += tl.sum(pos.to(tl.int32), 1)
        num_clipped += tl.sum((pos & (s + margin >= 1.0)).to(tl.int32), 1)  # SPEC 1.4 diagnostic

    lse = m_i + tl.log(sum_exp)
    loss = tl.where(num_pos > 0, lse - pos_logits / tl.maximum(num_pos, 1).to(ACC), 0.0)
    tl.store(LOSS + rows, loss, mask=rmask)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(NPOS + rows, num_pos, mask=rmask)
    tl.store(NCLIP + rows, num_clipped, mask=rmask)


@triton.jit
def _supcon_bwd_kernel(ZR, ZC, YR, YC, NORM_R, NORM_C, LSE_R, A_R, B_R, LSE_C, A_C, B_C, DZ,
                       n_rows, n_cols, dim, row_offset, stride_r, stride_c, stride_dz, inv_tau, margin,
                       ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                       UPCAST: tl.constexpr, SCALED: tl.constexpr):
    rows, rmask, dk, y_k, z_k = _anchor_block(ZR, YR, n_rows, dim, stride_r, BLOCK_M, BLOCK_D, SINGLE_D)
    lse_k = tl.load(LSE_R + rows, mask=rmask, other=0.0)
    a_k = tl.load(A_R + rows, mask=rmask, other=0.0)
    b_k = tl.load(B_R + rows, mask=rmask, other=0.0)
    row_global = rows + row_offset
    r_k = _inverse_norm(NORM_R, rows, rmask) if SCALED else tl.full([BLOCK_M], 1.0, ACC)
    dz = tl.zeros([BLOCK_M, BLOCK_D], ACC)

    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n_cols
        s, z_j, r_j = _similarity_tile(z_k, ZC, cols, cmask, rows, rmask, ZR, stride_r, stride_c, dim, dk, NORM_C,
                                       r_k, ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, UPCAST, SCALED)
        y_j = tl.load(YC + cols, mask=cmask, other=0)
        lse_j = tl.load(LSE_C + cols, mask=cmask, other=0.0)
        a_j = tl.load(A_C + cols, mask=cmask, other=0.0)
        b_j = tl.load(B_C + cols, mask=cmask, other=0.0)
        valid, pos, logits = _margined_logits(s, row_global, rmask, y_k, cols, cmask, y_j, inv_tau, margin)
        # kappa: a clipped positive (s + m > 1, strictly, as torch.clamp) passes no gradient
        kappa = valid & ~(pos & (s + margin > 1.0))
        # G_kj + G_jk; l_kj = l_jk because s and M are symmetric
        g = a_k[:, None] * tl.exp(logits - lse_k[:, None]) + a_j[None, :] * tl.exp(logits - lse_j[None, :])
        g = g - tl.where(pos, b_k[:, None] + b_j[None, :], 0.0)
        g = tl.where(kappa, g, 0.0)
        if SCALED:
            g = g * r_j[None, :]  # (G_kj + G_jk) z_j = (G_kj + G_jk) r_j x_j
        g = g.to(ZC.dtype.element_ty)  # tensor-core operand in the input dtype
        if SINGLE_D:
            dz = _dot(g, z_j, dz, PRECISION, UPCAST)
        else:
            # D does not fit one block: this program owns its rows of DZ, so it accumulates there
            # (read-modify-write, no atomics) one feature block at a time.
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + dk
                dmask = d[None, :] < dim
                zc = tl.load(ZC + cols[:, None] * stride_c + d[None, :], mask=cmask[:, None] & dmask, other=0.0)
                ptr = DZ + rows[:, None] * stride_dz + d[None, :]
                prev = tl.load(ptr, mask=rmask[:, None] & dmask, other=0.0)
                tl.store(ptr, _dot(g, zc, prev, PRECISION, UPCAST), mask=rmask[:, None] & dmask)
    if SINGLE_D:
        if SCALED:
            # through the normalization: dL/dx_k = r_k (dz_k - z_k (z_k . dz_k)), written in x's dtype
            z = z_k.to(ACC) * r_k[:, None]
            norm_k = tl.load(NORM_R + rows, mask=rmask, other=1.0)
            along = tl.where(norm_k > 1e-12, tl.sum(z * dz, 1), 0.0)
            dz = r_k[:, None] * (dz - z * along[:, None])
        tl.store(DZ + rows[:, None] * stride_dz + dk[None, :], dz.to(DZ.dtype.element_ty),
                 mask=rmask[:, None] & (dk[None, :] < dim))


MAX_SINGLE_D = 256  # up to this feature width a program keeps its rows' z and dz in registers


def _config(dim: int, dtype: torch.dtype):
    block_d = max(16, triton.next_power_of_2(dim))  # tl.dot needs every block dim >= 16
    # z tiles of both operands are staged in shared memory: keep them within the sm_80/sm_90 limits
    # (tests/triton_compile_check.py compiles every configuration and checks the figure)
    single = block_d <= (128 if dtype == torch.float64 else MAX_SINGLE_D)
    if not single:
        block_d = 64
    if is_interpreter():
        # numpy runs one program at a time: fewer, larger programs are faster
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, SINGLE_D=single, UPCAST=dtype == torch.bfloat16), 1
    four_byte = dtype in (torch.float32, torch.float64)
    wide = single and block_d > 128
    block_m = 32 if (wide and four_byte) else 64
    block_n = 32 if (wide or four_byte) else 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single, UPCAST=False), (8 if wide else 4)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def supcon_forward(zr, yr, zc, yc, row_offset: int, temperature: float, margin: float, norm_r=None, norm_c=None):
    """Anchors zr [n, D] (global rows row_offset..) against all rows zc [N, D].
    Returns (L [n], lse [n], |P(i)| [n] int32, clipped [n] int32). With row norms norm_r, norm_c
    the rows are raw features, normalized on the fly."""
    zr, zc = zr.contiguous(), zc.contiguous()
    n, dim = zr.shape
    loss = torch.empty(n, dtype=_stat_dtype(zr.dtype), device=zr.device)
    lse = torch.empty_like(loss)
    num_pos = torch.empty(n, dtype=torch.int32, device=zr.device)
    num_clipped = torch.empty_like(num_pos)
    scaled = norm_r is not None
    cfg, warps = _config(dim, zr.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    _supcon_fwd_kernel[grid](zr, zc, yr.contiguous(), yc.contiguous(), norm_r if scaled else loss,
                             norm_c if scaled else loss, loss, lse, num_pos, num_clipped,
                             n, zc.shape[0], dim, row_offset, zr.stride(0), zc.stride(0),
                             1.0 / temperature, margin, ACC=_acc(zr.dtype), PRECISION=dot_precision(zr.dtype),
                             SCALED=scaled, num_warps=warps, **cfg)
    return loss, lse, num_pos, num_clipped


def supcon_backward(zr, yr, zc, yc, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c, temperature, margin,
                    norm_r=None, norm_c=None):
    """dL/dz of the anchors zr (float32; float64 for float64 inputs), SPEC 1.3. With row norms,
    zr/zc are raw features and the result is dL/dx in zr's dtype, through the normalization."""
    zr, zc = zr.contiguous(), zc.contiguous()
    n, dim = zr.shape
    acc_dtype = _stat_dtype(zr.dtype)
    scaled = norm_r is not None
    cfg, warps = _config(dim, zr.dtype)
    if cfg["SINGLE_D"]:
        dz = torch.empty((n, dim), dtype=zr.dtype if scaled else acc_dtype, device=zr.device)
    else:
        dz = torch.zeros((n, dim), dtype=acc_dtype, device=zr.device)  # accumulated in place
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    stats = [t.contiguous().to(acc_dtype) for t in (lse_r, a_r, b_r, lse_c, a_c, b_c)]
    _supcon_bwd_kernel[grid](zr, zc, yr.contiguous(), yc.contiguous(), norm_r if scaled else stats[0],
                             norm_c if scaled else stats[0], *stats, dz,
                             n, zc.shape[0], dim, row_offset, zr.stride(0), zc.stride(0), dz.stride(0),
                             1.0 / temperature, margin, ACC=_acc(zr.dtype), PRECISION=dot_precision(zr.dtype),
                             SCALED=scaled, num_warps=warps, **cfg)
    if scaled and not cfg["SINGLE_D"]:
        # wide D: the kernel accumulated dz_k = sum_j (G_kj + G_jk) r_j x_j; project here
        r = 1.0 / norm_r.clamp(min=1e-12)
        z = zr.to(acc_dtype) * r[:, None]
        along = torch.where(norm_r > 1e-12, (z * dz).sum(1), torch.zeros_like(r))
        dz = (r[:, None] * (dz - z * along[:, None])).to(zr.dtype)
    return dz


class MarginalSupConRows(torch.autograd.Function):
    """(x [N, D], labels [N]) -> per-anchor loss L [N] (and |P(i)|, clipped counts, not
    differentiable). With normalize, x is normalized inside the kernels: memory beyond the
    inputs is the per-row statistics (norm, lse, |P|) only; backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, x, labels, temperature, margin, normalize):
        x = x.contiguous()
        norm = torch.linalg.vector_norm(x, dim=1, dtype=_stat_dtype(x.dtype)) if normalize else None
        loss, lse, num_pos, num_clipped = supcon_forward(x, labels, x, labels, 0, temperature, margin, norm, norm)
        ctx.save_for_backward(x, labels, lse, num_pos, norm)
        ctx.temperature, ctx.margin = temperature, margin
        ctx.mark_non_differentiable(num_pos, num_clipped)
        return loss, num_pos, num_clipped

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_clipped):
        x, labels, lse, num_pos, norm = ctx.saved_tensors
        a, b = backward_coefficients(grad_loss.to(lse.dtype), num_pos, ctx.temperature)
        dx = supcon_backward(x, labels, x, labels, 0, lse, a, b, lse, a, b, ctx.temperature, ctx.margin, norm, norm)
        return dx.to(x.dtype), None, None, None, None
