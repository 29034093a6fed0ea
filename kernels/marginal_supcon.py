"""Fused Triton kernels of the marginal supervised contrastive loss (SPEC 1), and their launchers.

Both kernels tile the similarity matrix s = z z^T into [BLOCK_M x BLOCK_N] tiles and never store it:
  forward   one program owns BLOCK_M anchors and sweeps all column tiles with a logsumexp,
            writing per anchor L_i, lse_i, |P(i)| and the clipped count.
  backward  one program owns BLOCK_M rows k and sweeps all column tiles j, recomputing s from z and
            forming the symmetric pair term of SPEC 1.3,
                dz_k = sum_{j != k} (G_kj + G_jk) z_j,  G_ij = kappa_ij (a_i p_ij - b_i M_ij),
            which needs only per-row statistics of both k and j: no atomics, no N x N buffer.
Anchors (rows) are a contiguous slice of all rows (columns) starting at global index row_offset;
single-process use passes the same tensor for both (row_offset 0), the distributed loss passes
the local rows against the gathered global batch.

Logits in base 2. With K = log2(e) / tau every pair is one fused multiply-add of the raw product,
    w_ij = log2(e) (l_ij - sigma) = raw_ij q_i q_j + c(M_ij),   then clipped: w_ij <= w_clip,
q_i = sqrt(K) r_i (r_i = 1 / max(||x_i||, eps) when normalization is fused, else 1): q_i q_j is the
same number for (i, j) and (j, i), so s is exactly symmetric. Two regimes:
  bounded (unit rows, K <= BOUNDED_MAX_K): sigma = 1/tau is the largest possible logit (|s| <= 1),
      so there is no running maximum: c = K (m - 1) on positives, -K otherwise, w_clip = 0 (which
      is t <= 1 for positives, and a no-op up to rounding elsewhere). Backward needs one
      exponential per pair: a_k p_kj + a_j p_jk = 2^w (alpha_k + alpha_j), alpha = a e^{sigma - lse},
      finite because 2^{2K} fits fp32's exponent range.
  online (raw rows or very small tau): sigma = 0, c = K m on positives, 0 otherwise, positives
      clipped at w_clip = K; running maximum (FlashAttention's online logsumexp) and two
      exponentials per pair in backward.
Then lse_i = ln2 (m_i + log2 sum_j 2^{w_ij - m_i}) + sigma and
    L_i = ln2 (m_i + log2 sum_j 2^{w_ij - m_i} - (1/|P(i)|) sum_{j in P(i)} w_ij)   (no 1/tau cancels).
A positive is clipped (SPEC 1.4 counts it) when w_ij before the clip >= w_clip, i.e. s_ij + m >= 1,
and passes no gradient when > w_clip (torch.clamp's convention).

Interior tiles (no diagonal, no ragged edge) run a mask-free body; only the tiles that hold the
self-pairs and the last ragged tile evaluate masks. Offsets inside a tile are int32 (the tile's
base pointer is advanced in 64 bits). Labels are read as given (int32 or int64): narrowing int64
labels safely would need a device sync per call. Scalars come from a small tensor in the accumulation dtype,
so float64 kernels get float64 constants (a Python float argument is fp32 on a GPU).

Fused normalization (SCALED): the kernels read raw features x in their own dtype and the row norms:
  dz_k = sum_j (G_kj + G_jk) r_j x_j,   dL/dx_k = r_k (dz_k - z_k (z_k . dz_k))
(no projection where ||x_k|| <= eps: there z = x / eps), written in the input dtype. In float16 the
gradient operand (G_kj + G_jk) r_j, about 1/(N^2 tau), is scaled by a power of two before it is
rounded to fp16 (else it underflows) and unscaled in fp32 after the product; a zero row takes
r_j = 0 in that operand (it contributes 0 to every other row), since 1e12 would overflow fp16.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._launch import dot_precision, is_interpreter, launch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LN2 = tl.constexpr(LN2)
BOUNDED_MAX_K = 56.0  # tau >= 0.0258: 2^{+-2K} stays inside fp32's normal range


@triton.jit
def _dot(a, b, acc, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: the interpreter's numpy matmul cannot read bfloat16, so there the
    operands are widened to fp32 first (exact: bf16 products are exact in fp32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=ACC)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _col_load(PTR, cols, cmask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(PTR + cols, mask=cmask, other=0)
    return tl.load(PTR + cols)


@triton.jit
def _raw_tile(x_i, XR_blk, XC_tile, offs_r, offs_c, col_in_tile, cmask, dk, dim,
              ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
              MASKED: tl.constexpr):
    """raw_ij = x_i . x_j for one tile; also x_j [BLOCK_N, BLOCK_D] when SINGLE_D (backward reuses it)."""
    if SINGLE_D:
        if MASKED:
            x_j = tl.load(XC_tile + offs_c, mask=cmask[:, None] & ((dk[None, :] < dim) | EVEN_D), other=0.0)
        elif EVEN_D:
            x_j = tl.load(XC_tile + offs_c)
        else:
            x_j = tl.load(XC_tile + offs_c, mask=dk[None, :] < dim, other=0.0)
        raw = _dot(x_i, tl.trans(x_j), tl.zeros([BLOCK_M, BLOCK_N], ACC), ACC, PRECISION, UPCAST)
    else:
        x_j = tl.zeros([BLOCK_N, BLOCK_D], XC_tile.dtype.element_ty)  # unused: loaded chunk by chunk
        raw = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for d0 in range(0, dim, BLOCK_D):
            dmask = (d0 + dk) < dim
            a = tl.load(XR_blk + offs_r + d0, mask=dmask[None, :], other=0.0)
            if MASKED:
                b = tl.load(XC_tile + offs_c + d0, mask=cmask[None, :] & dmask[:, None], other=0.0)
            else:
                b = tl.load(XC_tile + offs_c + d0, mask=dmask[:, None], other=0.0)
            raw = _dot(a, b, raw, ACC, PRECISION, UPCAST)
    return raw, x_j


@triton.jit
def _pair_logits(raw, q_i, q_j, k, y_i, y_j, c_pos, c_neg, w_clip, SCALED: tl.constexpr, BOUNDED: tl.constexpr):
    """w_ij before and after the clip, and the positive mask M_ij (labels only; the caller removes
    self-pairs and padding in masked tiles)."""
    pos = y_i[:, None] == y_j[None, :]
    if SCALED:
        w_pre = raw * (q_i[:, None] * q_j[None, :]) + tl.where(pos, c_pos, c_neg)
    else:
        w_pre = raw * k + tl.where(pos, c_pos, c_neg)
    if BOUNDED:
        w = tl.minimum(w_pre, w_clip)
    else:
        w = tl.where(pos, tl.minimum(w_pre, w_clip), w_pre)
    return w_pre, w, pos


@triton.jit
def _consts(CONSTS):
    """K = log2(e)/tau, c(positive), c(negative), w_clip, sigma (see the module docstring)."""
    return tl.load(CONSTS), tl.load(CONSTS + 1), tl.load(CONSTS + 2), tl.load(CONSTS + 3), tl.load(CONSTS + 4)


@triton.jit
def _fwd_tile(start, x_i, XR_blk, XC, YC, QC, offs_r, offs_c, q_i, y_i, rows_g, n_cols, dim, stride_c, dk,
              k, c_pos, c_neg, w_clip, m_i, sum_e, pos_w, n_pos, n_clip,
              ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
              SCALED: tl.constexpr, BOUNDED: tl.constexpr, MASKED: tl.constexpr):
    col_in_tile = tl.arange(0, BLOCK_N)
    cols = start + col_in_tile
    cmask = cols < n_cols
    XC_tile = XC + tl.cast(start, tl.int64) * stride_c
    raw, _x_j = _raw_tile(x_i, XR_blk, XC_tile, offs_r, offs_c, col_in_tile, cmask, dk, dim,
                          ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, EVEN_D, UPCAST, MASKED)
    y_j = _col_load(YC, cols, cmask, MASKED)
    if SCALED:
        q_j = _col_load(QC, cols, cmask, MASKED)
    else:
        q_j = tl.full([BLOCK_N], 1.0, ACC)  # unused
    w_pre, w, pos = _pair_logits(raw, q_i, q_j, k, y_i, y_j, c_pos, c_neg, w_clip, SCALED, BOUNDED)
    if MASKED:
        valid = cmask[None, :] & (rows_g[:, None] != cols[None, :])
        pos = pos & valid
        w = tl.where(valid, w, float("-inf"))
    if BOUNDED:
        sum_e += tl.sum(tl.exp2(w), 1)
    else:
        # online logsumexp; m_safe keeps exp2() finite while a row has seen no valid column yet
        m_new = tl.maximum(m_i, tl.max(w, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        sum_e = sum_e * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(w - m_safe[:, None]), 1)
        m_i = m_new
    pos_w += tl.sum(tl.where(pos, w, 0.0), 1)
    n_pos += tl.sum(pos.to(tl.int32), 1)
    n_clip += tl.sum((pos & (w_pre >= w_clip)).to(tl.int32), 1)  # SPEC 1.4: s + m >= 1
    return m_i, sum_e, pos_w, n_pos, n_clip


@triton.jit
def _anchor_block(XR, QR, n_rows, dim, stride_r, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  SINGLE_D: tl.constexpr, SCALED: tl.constexpr):
    """This program's BLOCK_M anchors: local indices, mask, their x (whole when SINGLE_D, kept for
    the sweep; else the block's base pointer and int32 offsets) and q_i."""
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    dk = tl.arange(0, BLOCK_D)
    XR_blk = XR + row0.to(tl.int64) * stride_r
    offs_r = tl.arange(0, BLOCK_M)[:, None] * stride_r + dk[None, :]
    if SINGLE_D:
        x_i = tl.load(XR_blk + offs_r, mask=rmask[:, None] & (dk[None, :] < dim), other=0.0)
    else:
        x_i = tl.zeros([BLOCK_M, BLOCK_D], XR.dtype.element_ty)  # unused
    if SCALED:
        q_i = tl.load(QR + rows, mask=rmask, other=0.0)
    else:
        q_i = tl.full([BLOCK_M], 1.0, ACC)  # unused
    return row0, rows, rmask, dk, XR_blk, offs_r, x_i, q_i


@triton.jit
def _sweep_bounds(row0, row_offset, n_cols, cols_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's columns [c0, c1) (split program_id(axis -1) of the sweep) in four runs:
    interior tiles, the tiles that hold these anchors' self-pairs, interior again, the ragged
    tail. Every bound is a multiple of BLOCK_N but n_cols, so tiles keep their positions."""
    c0 = tl.program_id(2) * cols_per_split
    c1 = tl.minimum(c0 + cols_per_split, n_cols)
    full = (n_cols // BLOCK_N) * BLOCK_N
    g0 = row0 + row_offset
    d_lo = tl.minimum((g0 // BLOCK_N) * BLOCK_N, full)
    d_hi = tl.minimum(tl.cdiv(g0 + BLOCK_M, BLOCK_N) * BLOCK_N, full)
    return (c0, tl.minimum(c1, d_lo), tl.maximum(c0, d_lo), tl.minimum(c1, d_hi), tl.maximum(c0, d_hi),
            tl.minimum(c1, full), tl.maximum(c0, full), c1)


@triton.jit
def _supcon_fwd_kernel(XR, XC, YR, YC, QR, QC, CONSTS, LOSS, LSE, NPOS, NCLIP, FPART, IPART,
                       n_rows, n_cols, dim, row_offset, stride_r, stride_c, cols_per_split,
                       ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                       EVEN_D: tl.constexpr, UPCAST: tl.constexpr, SCALED: tl.constexpr, BOUNDED: tl.constexpr,
                       PARTIAL: tl.constexpr):
    k, c_pos, c_neg, w_clip, sigma = _consts(CONSTS)
    row0, rows, rmask, dk, XR_blk, offs_r, x_i, q_i = _anchor_block(
        XR, QR, n_rows, dim, stride_r, ACC, BLOCK_M, BLOCK_D, SINGLE_D, SCALED)
    y_i = tl.load(YR + rows, mask=rmask, other=-1)
    rows_g = rows + row_offset
    if SINGLE_D:
        offs_c = tl.arange(0, BLOCK_N)[:, None] * stride_c + dk[None, :]
    else:
        offs_c = tl.arange(0, BLOCK_N)[None, :] * stride_c + dk[:, None]  # transposed chunk

    if BOUNDED:
        m_i = tl.zeros([BLOCK_M], ACC)  # fixed maximum: w <= 0
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), ACC)  # running max of w_ij
    sum_e = tl.zeros([BLOCK_M], ACC)  # sum_j 2^(w_ij - m_i)
    pos_w = tl.zeros([BLOCK_M], ACC)  # sum_{j in P(i)} w_ij
    n_pos = tl.zeros([BLOCK_M], tl.int32)
    n_clip = tl.zeros([BLOCK_M], tl.int32)
    a0, a1, b0, b1, c0, c1, t0, t1 = _sweep_bounds(row0, row_offset, n_cols, cols_per_split, BLOCK_M, BLOCK_N)
    for start in range(a0, a1, BLOCK_N):
        m_i, sum_e, pos_w, n_pos, n_clip = _fwd_tile(
            start, x_i, XR_blk, XC, YC, QC, offs_r, offs_c, q_i, y_i, rows_g, n_cols, dim, stride_c, dk,
            k, c_pos, c_neg, w_clip, m_i, sum_e, pos_w, n_pos, n_clip,
            ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, EVEN_D, UPCAST, SCALED, BOUNDED, False)
    for start in range(b0, b1, BLOCK_N):
        m_i, sum_e, pos_w, n_pos, n_clip = _fwd_tile(
            start, x_i, XR_blk, XC, YC, QC, offs_r, offs_c, q_i, y_i, rows_g, n_cols, dim, stride_c, dk,
            k, c_pos, c_neg, w_clip, m_i, sum_e, pos_w, n_pos, n_clip,
            ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, EVEN_D, UPCAST, SCALED, BOUNDED, True)
    for start in range(c0, c1, BLOCK_N):
        m_i, sum_e, pos_w, n_pos, n_clip = _fwd_tile(
            start, x_i, XR_blk, XC, YC, QC, offs_r, offs_c, q_i, y_i, rows_g, n_cols, dim, stride_c, dk,
            k, c_pos, c_neg, w_clip, m_i, sum_e, pos_w, n_pos, n_clip,
            ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, EVEN_D, UPCAST, SCALED, BOUNDED, False)
    for start in range(t0, t1, BLOCK_N):
        m_i, sum_e, pos_w, n_pos, n_clip = _fwd_tile(
            start, x_i, XR_blk, XC, YC, QC, offs_r, offs_c, q_i, y_i, rows_g, n_cols, dim, stride_c, dk,
            k, c_pos, c_neg, w_clip, m_i, sum_e, pos_w, n_pos, n_clip,
            ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, EVEN_D, UPCAST, SCALED, BOUNDED, True)

    if PARTIAL:  # one split of the sweep: its row statistics, combined by _supcon_fwd_combine
        part = tl.program_id(2) * n_rows + rows
        n_parts = tl.num_programs(2) * n_rows
        tl.store(FPART + part, m_i, mask=rmask)
        tl.store(FPART + n_parts + part, sum_e, mask=rmask)
        tl.store(FPART + 2 * n_parts + part, pos_w, mask=rmask)
        tl.store(IPART + part, n_pos, mask=rmask)
        tl.store(IPART + n_parts + part, n_clip, mask=rmask)
    else:
        _fwd_finish(rows, rmask, m_i, sum_e, pos_w, n_pos, n_clip, sigma, LOSS, LSE, NPOS, NCLIP, ACC)


@triton.jit
def _fwd_finish(rows, rmask, m_i, sum_e, pos_w, n_pos, n_clip, sigma, LOSS, LSE, NPOS, NCLIP, ACC: tl.constexpr):
    lse2 = m_i + tl.log2(sum_e)
    loss = tl.where(n_pos > 0, (lse2 - pos_w / tl.maximum(n_pos, 1).to(ACC)) * _LN2, 0.0)
    tl.store(LOSS + rows, loss, mask=rmask)
    tl.store(LSE + rows, lse2 * _LN2 + sigma, mask=rmask)
    tl.store(NPOS + rows, n_pos, mask=rmask)
    tl.store(NCLIP + rows, n_clip, mask=rmask)


@triton.jit
def _supcon_fwd_combine(FPART, IPART, CONSTS, LOSS, LSE, NPOS, NCLIP, n_rows, n_splits,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Merges the splits' (max, sum of 2^(w - max), sum of positive w, counts) per row, in split
    order (deterministic)."""
    _k, _cp, _cn, _clip, sigma = _consts(CONSTS)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n_rows
    n_parts = n_splits * n_rows
    m_i = tl.full([BLOCK], float("-inf"), ACC)
    for split in range(0, n_splits):
        m_i = tl.maximum(m_i, tl.load(FPART + split * n_rows + rows, mask=rmask, other=0.0))
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    sum_e = tl.zeros([BLOCK], ACC)
    pos_w = tl.zeros([BLOCK], ACC)
    n_pos = tl.zeros([BLOCK], tl.int32)
    n_clip = tl.zeros([BLOCK], tl.int32)
    for split in range(0, n_splits):
        part = split * n_rows + rows
        m_s = tl.load(FPART + part, mask=rmask, other=0.0)
        sum_e += tl.load(FPART + n_parts + part, mask=rmask, other=0.0) * tl.exp2(m_s - m_safe)
        pos_w += tl.load(FPART + 2 * n_parts + part, mask=rmask, other=0.0)
        n_pos += tl.load(IPART + part, mask=rmask, other=0)
        n_clip += tl.load(IPART + n_parts + part, mask=rmask, other=0)
    _fwd_finish(rows, rmask, m_safe, sum_e, pos_w, n_pos, n_clip, sigma, LOSS, LSE, NPOS, NCLIP, ACC)


@triton.jit
def _bwd_tile(start, x_k, XR_blk, XC, YC, QC, RGC, S1_C, S2_C, S3_C, offs_r, offs_c, offs_o, omask, q_k,
              y_k, s1_k, s2_k, s3_k, rows_g, rmask, n_cols, dim, stride_c, dk, k, c_pos, c_neg, w_clip, dz,
              ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
              SCALED: tl.constexpr, BOUNDED: tl.constexpr, MASKED: tl.constexpr):
    col_in_tile = tl.arange(0, BLOCK_N)
    cols = start + col_in_tile
    cmask = cols < n_cols
    XC_tile = XC + tl.cast(start, tl.int64) * stride_c
    raw, x_j = _raw_tile(x_k, XR_blk, XC_tile, offs_r, offs_c, col_in_tile, cmask, dk, dim,
                         ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, EVEN_D, UPCAST, MASKED)
    y_j = _col_load(YC, cols, cmask, MASKED)
    s1_j = _col_load(S1_C, cols, cmask, MASKED)
    s2_j = _col_load(S2_C, cols, cmask, MASKED)
    if SCALED:
        q_j = _col_load(QC, cols, cmask, MASKED)
    else:
        q_j = tl.full([BLOCK_N], 1.0, ACC)  # unused
    rho_j = _col_load(RGC, cols, cmask, MASKED)  # the gradient operand's column factor (launcher)
    w_pre, w, pos = _pair_logits(raw, q_k, q_j, k, y_k, y_j, c_pos, c_neg, w_clip, SCALED, BOUNDED)
    # G_kj + G_jk (l_kj = l_jk: s and M are symmetric); s1 = alpha (bounded) or a, s2 = b, s3 = lse2
    if BOUNDED:
        g = tl.exp2(w) * (s1_k[:, None] + s1_j[None, :])
    else:
        s3_j = _col_load(S3_C, cols, cmask, MASKED)
        g = s1_k[:, None] * tl.exp2(w - s3_k[:, None]) + s1_j[None, :] * tl.exp2(w - s3_j[None, :])
    g = g - tl.where(pos, s2_k[:, None] + s2_j[None, :], 0.0)
    # kappa: a clipped positive (s + m > 1, strictly, as torch.clamp) passes no gradient
    dead = pos & (w_pre > w_clip)
    if MASKED:
        dead = dead | ~cmask[None, :] | (rows_g[:, None] == cols[None, :])
    g = tl.where(dead, 0.0, g) * rho_j[None, :]
    g = g.to(XC.dtype.element_ty)  # tensor-core operand in the input dtype
    if SINGLE_D:
        dz = _dot(g, x_j, dz, ACC, PRECISION, UPCAST)
    else:
        # split D: this program owns output features d_out.. d_out + BLOCK_DO of its rows
        if MASKED:
            x_o = tl.load(XC_tile + offs_o, mask=cmask[:, None] & omask[None, :], other=0.0)
        else:
            x_o = tl.load(XC_tile + offs_o, mask=omask[None, :], other=0.0)
        dz = _dot(g, x_o, dz, ACC, PRECISION, UPCAST)
    return dz


@triton.jit
def _supcon_bwd_kernel(XR, XC, YR, YC, QR, QC, RR, RGC, CONSTS, GSCALE, S1_R, S2_R, S3_R, S1_C, S2_C, S3_C, DZ,
                       n_rows, n_cols, dim, row_offset, stride_r, stride_c, stride_dz, cols_per_split,
                       ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                       EVEN_D: tl.constexpr, UPCAST: tl.constexpr, SCALED: tl.constexpr, BOUNDED: tl.constexpr,
                       GRAD_SCALE: tl.constexpr, BLOCK_DO: tl.constexpr, PARTIAL: tl.constexpr):
    k, c_pos, c_neg, w_clip, _sigma = _consts(CONSTS)
    row0, rows, rmask, dk, XR_blk, offs_r, x_k, q_k = _anchor_block(
        XR, QR, n_rows, dim, stride_r, ACC, BLOCK_M, BLOCK_D, SINGLE_D, SCALED)
    y_k = tl.load(YR + rows, mask=rmask, other=-1)
    s1_k = tl.load(S1_R + rows, mask=rmask, other=0.0)
    s2_k = tl.load(S2_R + rows, mask=rmask, other=0.0)
    if BOUNDED:
        s3_k = s2_k  # unused
    else:
        s3_k = tl.load(S3_R + rows, mask=rmask, other=0.0)
    rows_g = rows + row_offset
    # output features of this program: all of them (SINGLE_D) or the chunk program_id(1)
    d_out = tl.program_id(1) * BLOCK_DO
    do = d_out + tl.arange(0, BLOCK_DO)
    omask = do < dim
    # PARTIAL: split program_id(2) of the sweep writes its own fp32 slice [n_rows, D] of DZ
    DZ_blk = DZ + (tl.program_id(2) * n_rows + row0).to(tl.int64) * stride_dz
    offs_dz = tl.arange(0, BLOCK_M)[:, None] * stride_dz + do[None, :]
    offs_o = tl.arange(0, BLOCK_N)[:, None] * stride_c + do[None, :]
    if SINGLE_D:
        offs_c = tl.arange(0, BLOCK_N)[:, None] * stride_c + dk[None, :]
    else:
        offs_c = tl.arange(0, BLOCK_N)[None, :] * stride_c + dk[:, None]  # transposed chunk
    dz = tl.zeros([BLOCK_M, BLOCK_DO], ACC)

    a0, a1, b0, b1, c0, c1, t0, t1 = _sweep_bounds(row0, row_offset, n_cols, cols_per_split, BLOCK_M, BLOCK_N)
    for start in range(a0, a1, BLOCK_N):
        dz = _bwd_tile(start, x_k, XR_blk, XC, YC, QC, RGC, S1_C, S2_C, S3_C, offs_r, offs_c, offs_o, omask,
                       q_k, y_k, s1_k, s2_k, s3_k, rows_g, rmask, n_cols, dim, stride_c, dk, k, c_pos, c_neg,
                       w_clip, dz,
                       ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, EVEN_D, UPCAST, SCALED, BOUNDED, False)
    for start in range(b0, b1, BLOCK_N):
        dz = _bwd_tile(start, x_k, XR_blk, XC, YC, QC, RGC, S1_C, S2_C, S3_C, offs_r, offs_c, offs_o, omask,
                       q_k, y_k, s1_k, s2_k, s3_k, rows_g, rmask, n_cols, dim, stride_c, dk, k, c_pos, c_neg,
                       w_clip, dz,
                       ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, EVEN_D, UPCAST, SCALED, BOUNDED, True)
    for start in range(c0, c1, BLOCK_N):
        dz = _bwd_tile(start, x_k, XR_blk, XC, YC, QC, RGC, S1_C, S2_C, S3_C, offs_r, offs_c, offs_o, omask,
                       q_k, y_k, s1_k, s2_k, s3_k, rows_g, rmask, n_cols, dim, stride_c, dk, k, c_pos, c_neg,
                       w_clip, dz,
                       ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, EVEN_D, UPCAST, SCALED, BOUNDED, False)
    for start in range(t0, t1, BLOCK_N):
        dz = _bwd_tile(start, x_k, XR_blk, XC, YC, QC, RGC, S1_C, S2_C, S3_C, offs_r, offs_c, offs_o, omask,
                       q_k, y_k, s1_k, s2_k, s3_k, rows_g, rmask, n_cols, dim, stride_c, dk, k, c_pos, c_neg,
                       w_clip, dz,
                       ACC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D, EVEN_D, UPCAST, SCALED, BOUNDED, True)
    if SINGLE_D and not PARTIAL:
        if GRAD_SCALE:
            dz = dz / tl.load(GSCALE)  # a power of two: exact
        if SCALED:
            # through the normalization: dL/dx_k = r_k (dz_k - z_k (z_k . dz_k)), written in x's dtype;
            # r_k = 1e12 marks ||x_k|| <= eps, where F.normalize's clamp leaves no projection
            r_k = tl.load(RR + rows, mask=rmask, other=1.0)
            z = x_k.to(ACC) * r_k[:, None]
            along = tl.where(r_k < 1e12, tl.sum(z * dz, 1), 0.0)
            dz = r_k[:, None] * (dz - z * along[:, None])
        tl.store(DZ_blk + offs_dz, dz.to(DZ.dtype.element_ty), mask=rmask[:, None] & (dk[None, :] < dim))
    else:  # fp32 / fp64 partial: the launcher sums the splits, unscales and projects whole rows
        tl.store(DZ_blk + offs_dz, dz, mask=rmask[:, None] & omask[None, :])


MAX_SINGLE_D = 256  # up to this feature width a program can keep its rows' x and dz in registers


def _tiles(dim: int, dtype: torch.dtype, kernel: str, precision: str):
    """(BLOCK_M, BLOCK_N, warps, SINGLE_D, BLOCK_D, BLOCK_DO) on a GPU, chosen from the compiled
    code for sm_90a (benchmarks/sass_report.py: no spills, >= 2 CTAs per SM where possible, fewest
    issued instructions per pair; benchmarks/NOTES.md has the figures)."""
    width = max(16, triton.next_power_of_2(dim))  # tl.dot needs every block dim >= 16
    if dtype in (torch.bfloat16, torch.float16):
        if width <= 128:
            return 64, 32, 4, True, width, width
        if width <= MAX_SINGLE_D:
            return 64, 32, 8, True, width, width
        return (64, 32, 4, False, 32, 32) if kernel == "fwd" else (64, 32, 4, False, 32, 128)
    if dtype == torch.float32:
        if precision == "tf32" and width <= 128:
            return 64, 32, 4, True, width, width
        if kernel == "fwd" and width <= 64:
            return 64, 32, 4, True, width, width
        # 3xTF32 holds each operand twice (high and low parts): the products run over feature
        # chunks, and the backward splits its output features over programs (the similarity
        # tile is recomputed per split), to stay out of local memory
        return (64, 32, 4, False, 32, 32) if kernel == "fwd" else (64, 32, 4, False, 32, 64)
    # float64: FMA products
    if width <= 64 and kernel == "fwd":
        return 32, 32, 8, True, width, width
    return (32, 32, 4, False, 32, 32) if kernel == "fwd" else (32, 32, 4, False, 32, 32)


def _config(dim: int, dtype: torch.dtype, kernel: str = "fwd"):
    if is_interpreter():
        # numpy runs one program at a time: fewer, larger programs are faster
        width = max(16, triton.next_power_of_2(dim))
        single = width <= MAX_SINGLE_D
        block_m, block_n, warps, block_d, block_do = 32, 32, 1, (width if single else 64), (width if single else 64)
    else:
        block_m, block_n, warps, single, block_d, block_do = _tiles(dim, dtype, kernel, dot_precision(dtype))
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single, EVEN_D=dim % block_d == 0,
               UPCAST=is_interpreter() and dtype in (torch.bfloat16, torch.float16))
    if kernel == "bwd":
        cfg["BLOCK_DO"] = block_do
    return cfg, warps


@lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # recorded launches (no GPU): an H100/H200
    return torch.cuda.get_device_properties(device).multi_processor_count


def _column_splits(n_rows: int, n_cols: int, cfg: dict, programs_per_row_block: int, device: torch.device):
    """(columns per split, splits) of the column sweep. Small batches give fewer row blocks than
    SMs (the paper's N=1024: 16 programs on 132 SMs), so the sweep is split across programs,
    flash-decoding style, and the partial statistics or gradients combined: about two programs per
    SM, and at least 4 column tiles per split."""
    tiles = triton.cdiv(n_cols, cfg["BLOCK_N"])
    programs = triton.cdiv(n_rows, cfg["BLOCK_M"]) * programs_per_row_block
    splits = 1
    if not is_interpreter():
        sms = _sm_count(device)
        if programs < sms:
            splits = max(1, min(triton.cdiv(2 * sms, programs), tiles // 4))
    splits = _force_splits or splits
    cols_per_split = triton.cdiv(tiles, splits) * cfg["BLOCK_N"]
    return cols_per_split, triton.cdiv(n_cols, cols_per_split)


_force_splits = 0  # tests set it to exercise the split sweep under the interpreter


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_bounded(temperature: float, unit_rows: bool) -> bool:
    """The fixed-maximum regime (module docstring) holds for unit rows and K <= BOUNDED_MAX_K."""
    return unit_rows and LOG2E / temperature <= BOUNDED_MAX_K


@lru_cache(maxsize=256)
def _consts_tensor(temperature: float, margin: float, bounded: bool, dtype: torch.dtype, device: torch.device):
    """[K, c_pos, c_neg, w_clip, sigma] in the accumulation dtype, cached: schedules reuse a few
    (tau, m) pairs, so a step launches no host-to-device copy."""
    k = LOG2E / temperature
    if bounded:
        values = [k, k * (margin - 1.0), -k, 0.0, 1.0 / temperature]
    else:
        values = [k, k * margin, 0.0, k, 0.0]
    return torch.tensor(values, dtype=dtype, device=device)


def kernel_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels as the kernels read them: int32 and int64 as they are (one or two compares per pair),
    narrower integer types widened to int32. Never remapped: that would need a device sync."""
    if labels.dtype in (torch.int32, torch.int64):
        return labels.contiguous()
    return labels.to(torch.int32)


def _label_pair(yr, yc):
    """Anchor and column labels of one dtype (the kernels compare them)."""
    yr, yc = kernel_labels(yr), kernel_labels(yc)
    if yr.dtype != yc.dtype:
        yr, yc = yr.long(), yc.long()
    return yr, yc


def _fp16_gradient_scale(a_r, a_c):
    """2^-ceil(log2 max|a|): |G_kj + G_jk| <= 4 max|a|, so the scaled operand is O(1) in fp16
    instead of O(1 / (N^2 tau)), which fp16 flushes to zero. Stays on the device."""
    amax = torch.maximum(a_r.abs().max(), a_c.abs().max()).float()
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax)), torch.zeros_like(amax))
    return torch.exp2(-exponent).reshape(1)


def _inverse_norms(norm):
    """r = 1 / max(||x||, eps), as F.normalize (once per row, not once per tile)."""
    return 1.0 / norm.clamp(min=1e-12)


def _nan_if_non_finite(zr, zc, norm_r, norm_c, dtype):
    """0, or NaN if any feature is NaN or inf (0-dim, on the device, no sync).

    A non-finite row is NaN once normalized and sits in every anchor's denominator, so every
    output is NaN, as in the reference. The kernels cannot be trusted to carry that NaN: min/max
    on a GPU return the non-NaN operand (the clip at w_clip and the running max would turn a NaN
    logit into a finite one). From the row norms where the kernels normalize (a row with inf or
    NaN has a non-finite norm; huge finite rows come power-of-two scaled, ffkern.reference.row_scale)."""
    if norm_r is not None:
        bad = ~torch.isfinite(norm_r).all() | ~torch.isfinite(norm_c).all()
    else:
        bad = ~torch.isfinite(zr).all() | ~torch.isfinite(zc).all()
    return torch.where(bad, torch.full((), float("nan"), dtype=dtype, device=zr.device),
                       torch.zeros((), dtype=dtype, device=zr.device))


def supcon_forward(zr, yr, zc, yc, row_offset: int, temperature: float, margin: float, norm_r=None, norm_c=None,
                   unit_rows: bool = False):
    """Anchors zr [n, D] (global rows row_offset..) against all rows zc [N, D].
    Returns (L [n], lse [n], |P(i)| [n] int32, clipped [n] int32). With row norms norm_r, norm_c
    the rows are raw features, normalized on the fly. unit_rows: the rows are known to have norm
    <= 1 (normalized), which allows the bounded regime."""
    zr, zc = zr.contiguous(), zc.contiguous()
    n, dim = zr.shape
    stat = _stat_dtype(zr.dtype)
    loss = torch.empty(n, dtype=stat, device=zr.device)
    lse = torch.empty_like(loss)
    num_pos = torch.empty(n, dtype=torch.int32, device=zr.device)
    num_clipped = torch.empty_like(num_pos)
    yr32, yc32 = _label_pair(yr, yc)
    scaled = norm_r is not None
    bounded = is_bounded(temperature, unit_rows or scaled)
    consts = _consts_tensor(float(temperature), float(margin), bounded, stat, zr.device)
    if scaled:  # q = sqrt(K) r: q_i q_j = K r_i r_j is the same number for (i, j) and (j, i)
        sqrt_k = math.sqrt(LOG2E / temperature)
        q_r, q_c = _inverse_norms(norm_r) * sqrt_k, _inverse_norms(norm_c) * sqrt_k
    else:
        q_r = q_c = loss  # unused
    cfg, warps = _config(dim, zr.dtype, "fwd")
    n_cols = zc.shape[0]
    cols_per_split, splits = _column_splits(n, n_cols, cfg, 1, zr.device)
    partial = splits > 1
    fpart = torch.empty((3, splits, n) if partial else (1,), dtype=stat, device=zr.device)
    ipart = torch.empty((2, splits, n) if partial else (1,), dtype=torch.int32, device=zr.device)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), 1, splits)
    launch(_supcon_fwd_kernel, grid, zr, zc, yr32, yc32, q_r, q_c, consts, loss, lse, num_pos, num_clipped,
           fpart, ipart, n, n_cols, dim, row_offset, zr.stride(0), zc.stride(0), cols_per_split,
           ACC=_acc(zr.dtype), PRECISION=dot_precision(zr.dtype), SCALED=scaled, BOUNDED=bounded, PARTIAL=partial,
           num_warps=warps, **cfg)
    if partial:
        block = 128
        launch(_supcon_fwd_combine, (triton.cdiv(n, block),), fpart, ipart, consts, loss, lse, num_pos, num_clipped,
               n, splits, ACC=_acc(zr.dtype), BLOCK=block, num_warps=4)
    nan = _nan_if_non_finite(zr, zc, norm_r, norm_c, stat)
    return loss + nan, lse + nan, num_pos, num_clipped


def supcon_backward(zr, yr, zc, yc, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c, temperature, margin,
                    norm_r=None, norm_c=None, unit_rows: bool = False):
    """dL/dz of the anchors zr (float32; float64 for float64 inputs), SPEC 1.3. With row norms,
    zr/zc are raw features and the result is dL/dx in zr's dtype, through the normalization."""
    zr, zc = zr.contiguous(), zc.contiguous()
    n, dim = zr.shape
    acc_dtype = _stat_dtype(zr.dtype)
    scaled = norm_r is not None
    bounded = is_bounded(temperature, unit_rows or scaled)
    consts = _consts_tensor(float(temperature), float(margin), bounded, acc_dtype, zr.device)
    cfg, warps = _config(dim, zr.dtype, "bwd")
    n_out = triton.cdiv(dim, cfg["BLOCK_DO"])
    cols_per_split, splits = _column_splits(n, zc.shape[0], cfg, n_out, zr.device)
    finish = cfg["SINGLE_D"] and splits == 1
    # one feature block, one sweep: the kernel writes the finished gradient; else fp32 partials
    # [splits, n, D], summed here in split order (deterministic)
    dz = torch.empty((splits, n, dim), dtype=zr.dtype if (scaled and finish) else acc_dtype, device=zr.device)
    lse_r, a_r, b_r, lse_c, a_c, b_c = (t.contiguous().to(acc_dtype) for t in (lse_r, a_r, b_r, lse_c, a_c, b_c))
    if bounded:  # alpha = a e^{sigma - lse}: a_k p_kj = 2^{w_kj} alpha_k
        sigma = 1.0 / temperature
        stats = (a_r * torch.exp(sigma - lse_r), b_r, b_r, a_c * torch.exp(sigma - lse_c), b_c, b_c)
    else:  # lse in base 2
        stats = (a_r, b_r, lse_r * LOG2E, a_c, b_c, lse_c * LOG2E)
    grad_scale = zr.dtype == torch.float16
    gscale = _fp16_gradient_scale(a_r, a_c) if grad_scale else consts
    if scaled:
        sqrt_k = math.sqrt(LOG2E / temperature)
        r_r, r_c = _inverse_norms(norm_r), _inverse_norms(norm_c)
        q_r, q_c = r_r * sqrt_k, r_c * sqrt_k
        # (G_kj + G_jk) r_j x_j: a zero row (x_j = 0) takes r_j = 0, as 1e12 would overflow fp16
        rho_c = torch.where(norm_c > 0, r_c, torch.zeros_like(r_c))
    else:
        r_r = q_r = q_c = lse_r  # unused
        rho_c = torch.ones_like(lse_c)
    if grad_scale:
        rho_c = rho_c * gscale
    yr32, yc32 = _label_pair(yr, yc)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), n_out, splits)
    launch(_supcon_bwd_kernel, grid, zr, zc, yr32, yc32, q_r, q_c, r_r, rho_c, consts, gscale, *stats, dz,
           n, zc.shape[0], dim, row_offset, zr.stride(0), zc.stride(0), dz.stride(1), cols_per_split,
           ACC=_acc(zr.dtype), PRECISION=dot_precision(zr.dtype), SCALED=scaled, BOUNDED=bounded,
           GRAD_SCALE=grad_scale, PARTIAL=splits > 1, num_warps=warps, **cfg)
    dz = dz[0] if splits == 1 else dz.sum(0)
    if not finish:
        if grad_scale:
            dz = dz / gscale
        if scaled:
            # partials: dz_k = sum_j (G_kj + G_jk) r_j x_j; project whole rows here
            z = zr.to(acc_dtype) * r_r[:, None]
            along = torch.where(norm_r > 1e-12, (z * dz).sum(1), torch.zeros_like(r_r))
            dz = (r_r[:, None] * (dz - z * along[:, None])).to(zr.dtype)
    return dz + _nan_if_non_finite(zr, zc, norm_r, norm_c, dz.dtype)
