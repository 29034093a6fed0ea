"""Python registrations of the ffkern::* operators: fake (meta) implementations, so that the ops
trace under torch.compile(fullgraph=True), and autograd formulas (torch.library.register_autograd)
of the SupCon ops and of the *_backward ops (which refuse double backward); the fused FF ops'
autograd is C++ (csrc/ff_autograd.cpp).

The C++ schemas name this module (m.set_python_module("ffkern.cpp.ops")). Importing it loads the
compiled library first (building it if needed; see ffkern.cpp.build).
"""
from __future__ import annotations

import torch

from .._op_autograd import OperatorAutograd, call_backward_op
from . import build

build.load_library()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake implementations: output shapes and dtypes only ------------------------------------------


@torch.library.register_fake("ffkern::supcon_forward")
def _supcon_forward_fake(zr, yr, zc, yc, row_offset, temperature, margin):
    n, dt = zr.shape[0], _compute_dtype(zr.dtype)
    return zr.new_empty(n, dtype=dt), zr.new_empty(n, dtype=dt), zr.new_empty(n, dtype=torch.int32), zr.new_empty(
        n, dtype=torch.int32
    )


@torch.library.register_fake("ffkern::supcon_backward")
def _supcon_backward_fake(zr, yr, zc, yc, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c, temperature, margin):
    return zr.new_empty(zr.shape, dtype=_compute_dtype(zr.dtype))


@torch.library.register_fake("ffkern::supcon_rows")
def _supcon_rows_fake(z, labels, temperature, margin, operand_dtype=None):
    return _supcon_forward_fake(z, labels, z, labels, 0, temperature, margin)


# ffkern::goodness and ffkern::pair_loss are CompositeImplicitAutograd (the first output of
# goodness_fused / pair_loss_fused): no fake, no autograd of their own.


def _token_means_fake(h, skip_tokens):
    """The fused forwards' token means: [B, D] where T - skip_tokens > 1, else empty."""
    tokens = h.shape[1] if h.dim() == 3 else 1
    shape = (h.shape[0], h.shape[-1]) if tokens - skip_tokens > 1 else (0,)
    return h.new_empty(shape, dtype=_compute_dtype(h.dtype))


@torch.library.register_fake("ffkern::goodness_fused")
def _goodness_fused_fake(h, kind, skip_tokens):
    return h.new_empty(h.shape[0], dtype=_compute_dtype(h.dtype)), _token_means_fake(h, skip_tokens)


@torch.library.register_fake("ffkern::goodness_backward")
def _goodness_backward_fake(grad, h, kind, skip_tokens, mean=None):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.register_fake("ffkern::pair_loss_fused")
def _pair_loss_fused_fake(h_pos, h_neg, loss, param, kind, skip_tokens, activity_term):
    dt = _compute_dtype(h_pos.dtype)
    # the per-sample energies [B, 4]: the CPU kernels return them, the CUDA kernels an empty tensor
    energies = (h_pos.shape[0], 4) if h_pos.device.type == "cpu" else (0,)
    return (h_pos.new_empty((), dtype=dt), h_pos.new_empty(2 if activity_term else 0, dtype=dt),
            _token_means_fake(h_pos, skip_tokens), _token_means_fake(h_neg, skip_tokens),
            h_pos.new_empty(energies, dtype=dt))


@torch.library.register_fake("ffkern::pair_loss_backward")
def _pair_loss_backward_fake(grad, h_pos, h_neg, loss, param, kind, skip_tokens, activity=None, mean_pos=None,
                             mean_neg=None, energies=None):
    return (torch.empty_like(h_pos, memory_format=torch.contiguous_format),
            torch.empty_like(h_neg, memory_format=torch.contiguous_format))


# ---- autograd (ffkern._op_autograd: first-order reverse mode; the other modes raise clearly) ------

_autograd = OperatorAutograd("cpp", "ffkern")
for _name in ("supcon_forward", "supcon_backward", "goodness_backward", "pair_loss_backward"):
    _autograd.register_no_derivative(_name)


def round_operand(z: torch.Tensor, operand_dtype) -> torch.Tensor:
    """z as the forward kernel saw it: float16/bfloat16 operands when asked (as in the op). The
    backward kernels accumulate in fp32 and return an fp32 gradient for them."""
    if operand_dtype in (torch.float16, torch.bfloat16) and z.dtype == torch.float32:
        return z.to(operand_dtype)
    return z


def _supcon_rows_setup(ctx, inputs, output):
    z, labels, temperature, margin, operand_dtype = inputs
    _loss, lse, num_pos, _clipped = output
    ctx.save_for_backward(z, labels, lse, num_pos)
    ctx.temperature, ctx.margin, ctx.operand_dtype = temperature, margin, operand_dtype


def _supcon_rows_backward(ctx, grad_loss, grad_lse, _grad_pos, _grad_clipped):
    """SPEC 1.3 with c_i = grad_loss_i: G_ij = kappa_ij (a_i p_ij - b_i M_ij),
    a_i = (w_i g_i + g^lse_i) / tau, b_i = w_i g_i / (tau |P(i)|). The lse output's gradient
    enters a_i only, since d lse_i / d s_ij = kappa_ij p_ij / tau (exact for both outputs)."""
    z, labels, lse, num_pos = ctx.saved_tensors
    tau = ctx.temperature
    has_pos = num_pos > 0
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    g = torch.where(has_pos, grad_loss.to(lse.dtype), torch.zeros_like(lse))
    b = g / (tau * num_pos.clamp(min=1).to(lse.dtype))
    if grad_lse is not None:
        g = g + grad_lse.to(lse.dtype)
    a = g / tau
    zq = round_operand(z, ctx.operand_dtype)
    dz = call_backward_op(torch.ops.ffkern.supcon_backward, zq, labels, zq, labels, 0, lse, a, b, lse, a, b, tau,
                          ctx.margin)
    return dz.to(z.dtype), None, None, None, None


# Unused outputs get None, not zeros (the loss or lse of a caller that used only the other).
_autograd.register("supcon_rows", _supcon_rows_backward, setup_context=_supcon_rows_setup, materialize_grads=False)


# The autograd of the fused FF operators (goodness_fused, pair_loss_fused) is registered in C++
# (csrc/ff_autograd.cpp): a Python Autograd kernel costs ~10 us on every call of the operator, with
# or without grad, several per cent of an FF loss at 2^20 elements. It refuses the same modes with
# the same messages as _op_autograd; their *_backward operators keep the registrations above, which
# refuse double backward.
