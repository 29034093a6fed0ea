"""Fused Triton kernels of the Forward-Forward goodness losses (SPEC 2) and their launchers
(operators and autograd: _ops.py).

Forward reads each activation tensor once: per sample the token mean hbar (tokens t >= skip) and
the energies e1 = sum_{d < split} hbar_d^2, e2 = sum_{d >= split} hbar_d^2 (split = D/2 for SFFA,
D otherwise), then the loss term of the sample and the coefficients c1, c2 of its gradient,
        dterm/dhbar_d = c1 hbar_d (d < split),  c2 hbar_d (d >= split).
Backward reads the activations once more to rebuild hbar and writes
        dL/dh_{b,t,d} = scale * c_b(d) * hbar_{b,d} / T'   (t >= skip; 0 for skipped tokens),
T' = T - skip, scale = upstream gradient times the loss's 1/(2B) or 1/B.
SFFA's activity factor A = 1 + exp(-10 (mu+ + mu-)) (SPEC 2), fused when ACTIVITY is set (a
constexpr: the plain losses compile without it): forward also writes each sample's sum over d of
hbar for h+ and h- (rows 4 and 5 of the coefficients; mu = their sum over B / (B D), the mean of
all B T' D entries), from the hbar it already holds; backward adds a constant shift to every kept
element in the same store, dL/dh = A * (the plain gradient) + shift, the host folding A into
scale and computing shift = grad L_S (-10) (A - 1) / (B T' D) (_ops.py).
Scalars (1/T', goodness scale, theta or alpha, the SFFA clamp) come from a small tensor in the
accumulation dtype, so float64 kernels get float64 constants (a Python float is fp32 on a GPU).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ._launch import is_interpreter, launch

GOODNESS, FF, SYMBA, SFFA = 0, 1, 2, 3
LOSS_IDS = {"ff": FF, "symba": SYMBA, "sffa": SFFA}
SFFA_EPS = 1e-4  # q is clamped to [eps, 1 - eps]


@triton.jit
def _token_mean(H, rows, d, mask, T, skip, stride_b, stride_t, inv_count,
                ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """hbar [BLOCK_B, BLOCK_D]: mean over tokens skip..T-1 of features d of samples rows."""
    total = tl.zeros([BLOCK_B, BLOCK_D], ACC)
    for t in range(skip, T):
        total += tl.load(H + rows[:, None] * stride_b + t * stride_t + d[None, :], mask=mask, other=0.0).to(ACC)
    return total * inv_count


@triton.jit
def _energies(H, rows, rmask, T, dim, skip, stride_b, stride_t, inv_count, split,
              SUMS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """e1, e2 [BLOCK_B] and, when SUMS, total = sum_d hbar_d (zeros otherwise: SFFA's activity)."""
    e1 = tl.zeros([BLOCK_B], ACC)
    e2 = tl.zeros([BLOCK_B], ACC)
    total = tl.zeros([BLOCK_B], ACC)
    dk = tl.arange(0, BLOCK_D)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + dk
        mask = rmask[:, None] & (d[None, :] < dim)
        hbar = _token_mean(H, rows, d, mask, T, skip, stride_b, stride_t, inv_count, ACC, BLOCK_B, BLOCK_D)
        sq = hbar * hbar
        e1 += tl.sum(tl.where(d[None, :] < split, sq, 0.0), 1)
        e2 += tl.sum(tl.where(d[None, :] < split, 0.0, sq), 1)
        if SUMS:  # masked entries are 0: the sum is over the D features only
            total += tl.sum(hbar, 1)
    return e1, e2, total


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _sffa_term(e1, e2, NEGATIVE: tl.constexpr, eps):
    """-log q (positive) or -log(1 - q) (negative), q = e1 / (e1 + e2) clamped to [eps, 1 - eps];
    returns the term and c1, c2 (the clamp passes no gradient outside its range). An all-zero
    sample (e1 + e2 = 0) has q = 1/2 and no gradient, as ffkern.reference.sffa_q defines; a NaN
    or inf activation gives q = NaN (inf / inf), so the loss is NaN, never a finite "dead" sample."""
    total = e1 + e2
    alive = total != 0.0  # NaN counts as alive: it must reach the loss
    total = tl.where(alive, total, 1.0)
    q_raw = tl.where(alive, e1 / total, 0.5)
    q = tl.minimum(tl.maximum(q_raw, eps), 1.0 - eps)
    q = tl.where(q_raw != q_raw, q_raw, q)  # min/max may drop a NaN on a GPU: keep it
    inside = alive & (q_raw >= eps) & (q_raw <= 1.0 - eps)
    if NEGATIVE:
        term = -tl.log(1.0 - q)
        dq = 1.0 / (1.0 - q)
    else:
        term = -tl.log(q)
        dq = -1.0 / q
    dq = tl.where(inside, dq, 0.0)
    # dq/de1 = e2 / total^2, dq/de2 = -e1 / total^2, de/dhbar_d = 2 hbar_d
    c1 = 2.0 * dq * e2 / (total * total)
    c2 = -2.0 * dq * e1 / (total * total)
    return term, c1, c2


@triton.jit
def _ff_fwd_kernel(HP, HN, OUT, COEF, CONSTS, B, T, dim, skip, stride_pb, stride_pt, stride_nb, stride_nt, split,
                   LOSS: tl.constexpr, ACTIVITY: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    inv_count, gscale, param, eps = tl.load(CONSTS), tl.load(CONSTS + 1), tl.load(CONSTS + 2), tl.load(CONSTS + 3)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    p1, p2, sum_p = _energies(HP, rows, rmask, T, dim, skip, stride_pb, stride_pt, inv_count, split, ACTIVITY, ACC,
                              BLOCK_B, BLOCK_D)
    if LOSS == 0:  # goodness only: g = gscale * sum_d hbar_d^2
        tl.store(OUT + rows, (p1 + p2) * gscale, mask=rmask)
    else:
        n1, n2, sum_n = _energies(HN, rows, rmask, T, dim, skip, stride_nb, stride_nt, inv_count, split, ACTIVITY, ACC,
                                  BLOCK_B, BLOCK_D)
        g_pos = (p1 + p2) * gscale
        g_neg = (n1 + n2) * gscale
        if LOSS == 1:  # FF: softplus(theta - g+) + softplus(g- - theta)
            term = _softplus(param - g_pos) + _softplus(g_neg - param)
            c_p1 = -2.0 * gscale * _sigmoid(param - g_pos)
            c_n1 = 2.0 * gscale * _sigmoid(g_neg - param)
            c_p2 = c_p1
            c_n2 = c_n1
        elif LOSS == 2:  # SymBa: softplus(-alpha (g+ - g-))
            x = -param * (g_pos - g_neg)
            term = _softplus(x)
            c_p1 = -2.0 * gscale * param * _sigmoid(x)
            c_n1 = -c_p1
            c_p2 = c_p1
            c_n2 = c_n1
        else:  # SFFA
            term_p, c_p1, c_p2 = _sffa_term(p1, p2, False, eps)
            term_n, c_n1, c_n2 = _sffa_term(n1, n2, True, eps)
            term = term_p + term_n
        tl.store(OUT + rows, term, mask=rmask)
        tl.store(COEF + rows, c_p1, mask=rmask)
        tl.store(COEF + B + rows, c_p2, mask=rmask)
        tl.store(COEF + 2 * B + rows, c_n1, mask=rmask)
        tl.store(COEF + 3 * B + rows, c_n2, mask=rmask)
        if ACTIVITY:
            tl.store(COEF + 4 * B + rows, sum_p, mask=rmask)
            tl.store(COEF + 5 * B + rows, sum_n, mask=rmask)


@triton.jit
def _ff_bwd_kernel(H, DH, C1, C2, SCALE, CONSTS, B, T, dim, skip, stride_b, stride_t, stride_db, stride_dt,
                   split, ACTIVITY: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    inv_count = tl.load(CONSTS)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    scale = tl.load(SCALE).to(ACC) * inv_count
    c1 = tl.load(C1 + rows, mask=rmask, other=0.0) * scale
    c2 = tl.load(C2 + rows, mask=rmask, other=0.0) * scale
    if ACTIVITY:  # SCALE = [A * the plain scale, shift]: the activity factor's constant (kept tokens only)
        shift = tl.load(SCALE + 1).to(ACC)
    dk = tl.arange(0, BLOCK_D)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + dk
        mask = rmask[:, None] & (d[None, :] < dim)
        hbar = _token_mean(H, rows, d, mask, T, skip, stride_b, stride_t, inv_count, ACC, BLOCK_B, BLOCK_D)
        grad = tl.where(d[None, :] < split, c1[:, None], c2[:, None]) * hbar  # (scale already holds 1/T')
        if ACTIVITY:
            grad += shift
        for t in range(0, T):
            value = tl.where(t >= skip, grad, 0.0)
            tl.store(DH + rows[:, None] * stride_db + t * stride_dt + d[None, :], value.to(DH.dtype.element_ty), mask=mask)


def _as_btd(h: torch.Tensor) -> torch.Tensor:
    h = h if h.dim() == 3 else h.unsqueeze(1)
    return h if h.stride(-1) == 1 else h.contiguous()


def _blocks(dim: int, dtype: torch.dtype = torch.float32):
    block_d = min(triton.next_power_of_2(dim), 256 if is_interpreter() else 128)
    elements = 1024 if is_interpreter() else (512 if dtype == torch.float64 else 1024)  # no spills (sm_90)
    block_b = max(1, elements // block_d)
    return block_b, block_d


def _acc_dtypes(dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


@lru_cache(maxsize=256)
def _consts(inv_count: float, gscale: float, param: float, dtype: torch.dtype, device: torch.device):
    """[1/T', goodness scale, theta or alpha, SFFA eps] in the accumulation dtype (cached)."""
    return torch.tensor([inv_count, gscale, param, SFFA_EPS], dtype=dtype, device=device)


def goodness_scale(kind: str, dim: int) -> float:
    return 1.0 / dim if kind == "mean" else 1.0


def split_of(loss_id: int, dim: int) -> int:
    """Features [0, split) are SFFA's first half (its q); the other losses use all of them."""
    return dim // 2 if loss_id == SFFA else dim


def forward(loss_id, h_pos, h_neg, param, kind, skip, activity=False):
    """(terms [B], coef, split, gscale); coef [4, B] (c_p1, c_p2, c_n1, c_n2), and with ``activity``
    (SFFA only) [6, B]: rows 4, 5 each sample's sum over d of hbar+ and hbar- (SFFA's activity)."""
    if activity and loss_id != SFFA:
        raise ValueError(f"activity: only the sffa loss has the activity factor, got loss id {loss_id}")
    hp = _as_btd(h_pos)
    hn = _as_btd(h_neg) if h_neg is not None else hp
    batch, tokens, dim = hp.shape
    acc, out_dtype = _acc_dtypes(hp.dtype)
    out = torch.empty(batch, dtype=out_dtype, device=hp.device)
    coef = torch.empty((6 if activity else 4, batch) if loss_id != GOODNESS else (1,), dtype=out_dtype,
                       device=hp.device)
    split = split_of(loss_id, dim)
    gscale = goodness_scale(kind, dim)
    block_b, block_d = _blocks(dim, hp.dtype)
    consts = _consts(1.0 / (tokens - skip), gscale, 0.0 if param is None else float(param), out_dtype, hp.device)
    launch(_ff_fwd_kernel, (triton.cdiv(batch, block_b),),
           hp, hn, out, coef, consts, batch, tokens, dim, skip, hp.stride(0), hp.stride(1), hn.stride(0), hn.stride(1),
           split, LOSS=loss_id, ACTIVITY=bool(activity), ACC=acc, BLOCK_B=block_b, BLOCK_D=block_d)
    return out, coef, split, gscale


def backward(h, c1, c2, scale, skip, split, activity=False):
    """dL/dh; scale [1] (the plain scale), or with ``activity`` [2]: (A times it, the shift added to
    every kept element)."""
    h3 = _as_btd(h)
    batch, tokens, dim = h3.shape
    dh = torch.empty(h3.shape, dtype=h.dtype, device=h.device)
    acc, acc_torch = _acc_dtypes(h.dtype)
    block_b, block_d = _blocks(dim, h.dtype)
    consts = _consts(1.0 / (tokens - skip), 1.0, 0.0, acc_torch, h.device)
    launch(_ff_bwd_kernel, (triton.cdiv(batch, block_b),),
           h3, dh, c1, c2, scale, consts, batch, tokens, dim, skip, h3.stride(0), h3.stride(1), dh.stride(0),
           dh.stride(1), split, ACTIVITY=bool(activity), ACC=acc, BLOCK_B=block_b, BLOCK_D=block_d)
    return dh.view(h.shape)
