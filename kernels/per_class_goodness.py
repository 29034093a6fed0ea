"""Fused Triton kernels of the per-class goodness loss (SPEC 2.2), their launchers, and the
operators torch.ops.ffkern_triton::{class_goodness, per_class_loss, per_class_backward}.

h [B, C, H, W] is read in place through its strides (contiguous NCHW and channels-last alike: the
H*W positions p of a sample are one stride apart), W [K, C], bias [K]. The class maps
z_bk(p) = sum_c W_kc h_bc(p) + beta_k are never written to memory:
  forward   one program per sample sweeps position tiles: z tile = W @ h tile (tl.dot over channel
            tiles, K padded to 16), g_bk += sum_p z^2; then the row's softmax cross-entropy
            L_b = logsumexp_k(s g_bk) - s g_b,y in the same program. Saved: g [B, K] only.
  backward  the per-class coefficients a_bk = dL/dg_bk * 2 / P come from g in PyTorch ([B, K]);
            a fixed number of programs (about two per SM) each take samples b = pid, pid + G, ...,
            rebuild the z tiles from h and W, and with dz = a z write dh = W^T dz (per position)
            and accumulate dW = sum dz h^T and dbias = sum dz in their own slice of a partial sum
            [G, K, C] / [G, K], which PyTorch adds up (deterministic: no atomics).
Where the whole channel dimension fits one tile (C <= 128 at K <= 16 on a GPU), the backward reads
each h tile once and keeps its dW slice in registers across all its samples; otherwise it reads
each h tile twice (the second time from L2) and adds to its dW slice in memory.
Compute in float32 (float64 for float64 inputs); bf16/fp16 h and W are read as they are and widened
in registers. Autograd and the refusal of the other modes: ffkern.per_class.PerClassAutograd.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ffkern.per_class import PerClassAutograd, grad_like, map_strides, reduce_losses, register_fakes, stat_dtype

from ._launch import dot_precision, is_interpreter, launch

NAMESPACE = "ffkern_triton"
# register tile (elements) per program and warps, per kernel: no spills on sm_90a (benchmarks/NOTES.md)
ELEMENTS = {"fwd": 2048, "bwd": 2048}
BWD_OPTIONS = {"num_stages": 2}  # 3 (the default) spills at K = 100 and in float64: one stage fewer of h in flight
WARPS = {"fwd": 8, "bwd": 4}  # the backward with K > 16 classes: 8 (K_PAD x BLOCK_P tiles of z and dz)


@triton.jit
def _load_h(H, base, c, p, C, P, stride_c, stride_p, ACC: tl.constexpr):
    """h[b, c, p] for channels c [BLOCK_C] and positions p [BLOCK_P], widened to ACC (0 outside)."""
    mask = (c[:, None] < C) & (p[None, :] < P)
    return tl.load(H + base + c[:, None].to(tl.int64) * stride_c + p[None, :].to(tl.int64) * stride_p, mask=mask,
                   other=0.0).to(ACC)


@triton.jit
def _load_w(W, k, c, K, C, ACC: tl.constexpr):
    """W[k, c] [K_PAD, BLOCK_C] (W contiguous [K, C]), 0 in the padding."""
    return tl.load(W + k[:, None] * C + c[None, :], mask=(k[:, None] < K) & (c[None, :] < C), other=0.0).to(ACC)


@triton.jit
def _class_maps(H, W, base, k, p, bias, K, C, P, stride_c, stride_p, ACC: tl.constexpr, PREC: tl.constexpr,
                K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """z [K_PAD, BLOCK_P] = W @ h[b, :, p] + bias, 0 at positions p >= P (and in rows k >= K)."""
    z = tl.zeros([K_PAD, BLOCK_P], ACC)
    cr = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cr
        z = tl.dot(_load_w(W, k, c, K, C, ACC), _load_h(H, base, c, p, C, P, stride_c, stride_p, ACC), z,
                   input_precision=PREC, out_dtype=ACC)
    return tl.where(p[None, :] < P, z + bias[:, None], 0.0)


@triton.jit
def _pc_fwd_kernel(H, W, BIAS, LABELS, SCALE, G, LOSS, K, C, P, stride_b, stride_c, stride_p,
                   HAS_BIAS: tl.constexpr, WITH_LOSS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * stride_b
    k = tl.arange(0, K_PAD)
    kmask = k < K
    if HAS_BIAS:
        bias = tl.load(BIAS + k, mask=kmask, other=0.0).to(ACC)
    else:
        bias = tl.zeros([K_PAD], ACC)
    total = tl.zeros([K_PAD], ACC)
    pr = tl.arange(0, BLOCK_P)
    for p0 in range(0, P, BLOCK_P):
        z = _class_maps(H, W, base, k, p0 + pr, bias, K, C, P, stride_c, stride_p, ACC, PREC, K_PAD, BLOCK_C, BLOCK_P)
        total += tl.sum(z * z, 1)
    g = total / P
    tl.store(G + b * K + k, g, mask=kmask)
    if WITH_LOSS:  # softmax cross-entropy of s g_b against y_b, in the same program
        logits = tl.where(kmask, tl.load(SCALE).to(ACC) * g, float("-inf"))
        top = tl.max(logits, 0)
        lse = top + tl.log(tl.sum(tl.exp(logits - top), 0))
        y = tl.load(LABELS + b).to(tl.int32)
        loss = lse - tl.sum(tl.where(k == y, logits, 0.0), 0)
        tl.store(LOSS + b, tl.where((y >= 0) & (y < K), loss, float("nan")))  # a bad label is never silent


@triton.jit
def _pc_bwd_kernel(H, W, BIAS, COEF, DH, DWP, DBP, B, K, C, P, stride_b, stride_c, stride_p, stride_db, stride_dc,
                   stride_dp, HAS_BIAS: tl.constexpr, ONE_C: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Samples pid, pid + G, ...: dh of each, and this program's share of dW [K, C] and dbias [K]
    into DWP[pid] and DBP[pid]. COEF [B, K]: dL/dg * 2 / P."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    k = tl.arange(0, K_PAD)
    kmask = k < K
    cr = tl.arange(0, BLOCK_C)
    pr = tl.arange(0, BLOCK_P)
    if HAS_BIAS:
        bias = tl.load(BIAS + k, mask=kmask, other=0.0).to(ACC)
    else:
        bias = tl.zeros([K_PAD], ACC)
    dbias = tl.zeros([K_PAD], ACC)
    dwp = DWP + pid.to(tl.int64) * K * C
    if ONE_C:  # all channels in one tile: h read once, W and this program's dW in registers
        w = _load_w(W, k, cr, K, C, ACC)
        wt = tl.trans(w)
        dw = tl.zeros([K_PAD, BLOCK_C], ACC)
    for b in range(pid, B, programs):
        b64 = tl.cast(b, tl.int64)
        base = b64 * stride_b
        dbase = b64 * stride_db
        coef = tl.load(COEF + b64 * K + k, mask=kmask, other=0.0)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + pr
            pmask = p[None, :] < P
            if ONE_C:
                h = _load_h(H, base, cr, p, C, P, stride_c, stride_p, ACC)
                z = tl.dot(w, h, input_precision=PREC, out_dtype=ACC)
                dz = tl.where(pmask, coef[:, None] * (z + bias[:, None]), 0.0)
                dh = tl.dot(wt, dz, input_precision=PREC, out_dtype=ACC)
                tl.store(DH + dbase + cr[:, None].to(tl.int64) * stride_dc + p[None, :].to(tl.int64) * stride_dp,
                         dh.to(DH.dtype.element_ty), mask=(cr[:, None] < C) & pmask)
                dw = tl.dot(dz, tl.trans(h), dw, input_precision=PREC, out_dtype=ACC)
            else:
                z = _class_maps(H, W, base, k, p, bias, K, C, P, stride_c, stride_p, ACC, PREC, K_PAD, BLOCK_C,
                                BLOCK_P)
                dz = coef[:, None] * z  # z is 0 at p >= P
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + cr
                    h = _load_h(H, base, c, p, C, P, stride_c, stride_p, ACC)
                    wt = tl.trans(_load_w(W, k, c, K, C, ACC))
                    dh = tl.dot(wt, dz, input_precision=PREC, out_dtype=ACC)
                    tl.store(DH + dbase + c[:, None].to(tl.int64) * stride_dc + p[None, :].to(tl.int64) * stride_dp,
                             dh.to(DH.dtype.element_ty), mask=(c[:, None] < C) & pmask)
                    wmask = kmask[:, None] & (c[None, :] < C)
                    offs = k[:, None] * C + c[None, :]
                    part = tl.load(dwp + offs, mask=wmask, other=0.0)
                    part = tl.dot(dz, tl.trans(h), part, input_precision=PREC, out_dtype=ACC)
                    tl.store(dwp + offs, part, mask=wmask)
            dbias += tl.sum(dz, 1)
    if ONE_C:
        tl.store(dwp + k[:, None] * C + cr[None, :], dw, mask=kmask[:, None] & (cr[None, :] < C))
    tl.store(DBP + pid.to(tl.int64) * K + k, dbias, mask=kmask)


# ---- launchers --------------------------------------------------------------------------------------


def _acc(dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _precision(dtype) -> str:
    # h and W are widened to the accumulation type: fp32 products follow the user's matmul precision
    return "ieee" if dtype == torch.float64 else dot_precision(torch.float32)


def tiles(channels: int, positions: int, classes: int, dtype: torch.dtype, kernel: str = "fwd"):
    """(K_PAD, BLOCK_C, BLOCK_P, ONE_C, warps). tl.dot needs every block dim >= 16. The register
    tiles (h [BLOCK_C, BLOCK_P], z [K_PAD, BLOCK_P], W and dW [K_PAD, BLOCK_C]) stay within
    ELEMENTS[kernel] (half for float64), which the sm_90a compile check holds free of spills
    (benchmarks/NOTES.md); the backward takes the whole channel dimension in one tile when it fits
    with at least 16 positions, so that it reads h once."""
    elements = ELEMENTS[kernel] // (2 if dtype == torch.float64 else 1)
    k_pad = max(16, triton.next_power_of_2(classes))
    c_full = max(16, triton.next_power_of_2(channels))
    p_full = max(16, min(64, triton.next_power_of_2(positions)))
    if kernel == "bwd" and c_full * 16 <= elements and k_pad * c_full <= elements:
        block_c, one_c = c_full, True
        block_p = max(16, min(p_full, elements // c_full))
    else:
        block_p, one_c = p_full, False
        block_c = max(16, min(c_full, elements // block_p, elements // k_pad))
    block_p = max(16, min(block_p, elements // k_pad))
    warps = 1 if is_interpreter() else (8 if kernel == "bwd" and k_pad > 16 else WARPS[kernel])
    return k_pad, block_c, block_p, one_c, warps


@lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # recorded launches (no GPU): an H100/H200
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs(batch: int, device: torch.device) -> int:
    """Backward programs: about two per SM (each adds its samples' dW into one [K, C] slice)."""
    return max(1, min(batch, 4 if is_interpreter() else 2 * _sm_count(device)))


def _as_kernel_input(h):
    """(h, stride_b, stride_c, stride_p): h itself where its positions are one stride apart
    (NCHW and channels-last), else a contiguous copy."""
    strides = map_strides(h)
    if strides is None:
        h = h.contiguous()
        strides = map_strides(h)
    return (h, *strides)


def forward(h, weight, bias, labels, scale):
    """(g [B, K], per-sample losses [B] or None without labels), both in the accumulation dtype."""
    batch, channels = h.shape[:2]
    classes, positions = weight.shape[0], h.shape[2] * h.shape[3]
    acc, acc_torch = _acc(h.dtype)
    h, sb, sc, sp = _as_kernel_input(h)
    w = weight.contiguous()
    g = torch.empty(batch, classes, dtype=acc_torch, device=h.device)
    with_loss = labels is not None
    loss = torch.empty(batch if with_loss else 1, dtype=acc_torch, device=h.device)
    k_pad, block_c, block_p, _one_c, warps = tiles(channels, positions, classes, h.dtype, "fwd")
    bias_arg = bias.contiguous() if bias is not None else g
    labels_arg = labels if with_loss else g
    scale_arg = scale.to(acc_torch).reshape(1) if with_loss else g
    if batch:
        launch(_pc_fwd_kernel, (batch,), h, w, bias_arg, labels_arg, scale_arg, g, loss, classes, channels, positions,
               sb, sc, sp, HAS_BIAS=bias is not None, WITH_LOSS=with_loss, ACC=acc, PREC=_precision(h.dtype),
               K_PAD=k_pad, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps)
    return g, (loss if with_loss else None)


def backward(h, weight, bias, coef):
    """(dh like h, dW [K, C] and dbias [K] in the accumulation dtype) from coef [B, K] =
    dL/dg * 2 / P (accumulation dtype)."""
    batch, channels = h.shape[:2]
    classes, positions = weight.shape[0], h.shape[2] * h.shape[3]
    acc, acc_torch = _acc(h.dtype)
    dh = grad_like(h)
    hk, sb, sc, sp = _as_kernel_input(h)
    db, dc, dp = map_strides(dh)
    k_pad, block_c, block_p, one_c, warps = tiles(channels, positions, classes, h.dtype, "bwd")
    programs = _programs(batch, h.device)
    # the two-pass path adds into its slice, the one-tile path stores it once
    make = torch.empty if one_c else torch.zeros
    dw_part = make(programs, classes, channels, dtype=acc_torch, device=h.device)
    db_part = torch.empty(programs, classes, dtype=acc_torch, device=h.device)
    if batch:
        launch(_pc_bwd_kernel, (programs,), hk, weight.contiguous(), bias.contiguous() if bias is not None else coef,
               coef.to(acc_torch).contiguous(), dh, dw_part, db_part, batch, classes, channels, positions, sb, sc, sp,
               db, dc, dp, HAS_BIAS=bias is not None, ONE_C=one_c, ACC=acc, PREC=_precision(h.dtype), K_PAD=k_pad,
               BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps, **BWD_OPTIONS)
        return dh, dw_part.sum(0), db_part.sum(0)
    return dh, torch.zeros(classes, channels, dtype=acc_torch, device=h.device), torch.zeros(
        classes, dtype=acc_torch, device=h.device)


# ---- operators ----------------------------------------------------------------------------------------

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # the namespace of kernels/_ops.py
_SCHEMAS = {
    # g [B, K] (float32; float64 for float64 h)
    "class_goodness": "class_goodness(Tensor h, Tensor weight, Tensor? bias) -> Tensor",
    # (the reduced loss, g [B, K]); scale: a one-element tensor
    "per_class_loss": "per_class_loss(Tensor h, Tensor weight, Tensor labels, Tensor? bias, Tensor scale,"
                      " str reduction) -> (Tensor, Tensor)",
    # coef = dL/dg [B, K]; returns (dh, dW [K, C], dbias [K]), the last two in the accumulation dtype
    "per_class_backward": "per_class_backward(Tensor h, Tensor weight, Tensor? bias, Tensor coef)"
                          " -> (Tensor, Tensor, Tensor)",
}


def _op(name):
    def register(fn):
        _lib.define(_SCHEMAS[name])
        for key in ("CPU", "CUDA"):  # CPU: the interpreter (TRITON_INTERPRET=1)
            _lib.impl(name, fn, key)
        return fn

    return register


@_op("class_goodness")
def _class_goodness(h, weight, bias):
    return forward(h, weight, bias, None, None)[0]


@_op("per_class_loss")
def _per_class_loss(h, weight, labels, bias, scale, reduction):
    g, losses = forward(h, weight, bias, labels, scale)
    return reduce_losses(losses, reduction), g


@_op("per_class_backward")
def _per_class_backward(h, weight, bias, coef):
    positions = h.shape[2] * h.shape[3]
    return backward(h, weight, bias, coef * (2.0 / positions))


_autograd = PerClassAutograd("triton", NAMESPACE, torch.ops.ffkern_triton)  # kept: it owns the kernels
_autograd.register_all()


register_fakes(NAMESPACE)  # output shapes and dtypes only (ffkern.per_class), for torch.compile


# ---- what the launchers launch on a GPU (the ahead-of-time compile check, tests/triton_compile_check.py)

AOT_SHAPES = (  # (B, C, K, H, W): the realistic case, K = 100 (two-pass backward), 1x1 maps
    (512, 256, 10, 8, 8),
    (512, 512, 100, 4, 4),
    (512, 64, 10, 1, 1),
)


def aot_launch_cases():
    """(description, Launch) of the forward and backward launches of one loss call per shape,
    dtype and layout, recorded from the launchers on CPU tensors (the fp32 matmul precision
    "highest": 3xTF32 products)."""
    from ._launch import record_launches

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for batch, channels, classes, height, width in AOT_SHAPES:
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                for layout in ("nchw", "channels_last"):
                    h = torch.zeros(batch, channels, height, width, dtype=dtype)
                    if layout == "channels_last":
                        h = h.contiguous(memory_format=torch.channels_last)
                    w = torch.zeros(classes, channels, dtype=dtype)
                    bias = torch.zeros(classes, dtype=dtype)
                    labels = torch.zeros(batch, dtype=torch.int64)
                    scale = torch.ones((), dtype=stat_dtype(dtype))
                    coef = torch.zeros(batch, classes, dtype=stat_dtype(dtype))
                    with record_launches() as launches:
                        forward(h, w, bias, labels, scale)
                        backward(h, w, bias, coef)
                    for rec in launches:
                        yield (f"per_class {rec.name} {str(dtype)[6:]} C={channels} K={classes} P={height * width} "
                               f"{layout}"), rec
    finally:
        torch.set_float32_matmul_precision(old)
