"""The Triton launchers as operators torch.ops.ffkern_triton::* (schemas, fake impls, autograd).

torch.compile(fullgraph=True) cannot trace a launcher (it reads data pointers, the user's matmul
precision, caches constant tensors), so the backend calls them as operators: Dynamo records an
opaque call with the output shapes of the fake impl, and the launcher runs at run time (so the
matmul precision is also read when the kernel runs, not when the graph was traced). The same
operators run in eager mode: one path. Autograd and the refusal of the other modes:
ffkern._op_autograd, as for the "cpp" backend.
"""
from __future__ import annotations

import torch

from ffkern import reference
from ffkern._op_autograd import OperatorAutograd, call_backward_op
from ffkern._supcon_function import backward_coefficients

from . import ff_goodness as FG
from . import marginal_supcon as SC

NAMESPACE = "ffkern_triton"
_lib = torch.library.Library(NAMESPACE, "DEF")
_SCHEMAS = {
    # x contiguous; labels int32/int64 (kernel_labels); norm: row norms (fp32/fp64) when the kernels
    # normalize, None for rows given normalized
    "supcon_rows": "supcon_rows(Tensor x, Tensor labels, Tensor? norm, float temperature, float margin)"
                   " -> (Tensor, Tensor, Tensor, Tensor)",
    "supcon_rows_backward": "supcon_rows_backward(Tensor x, Tensor labels, Tensor? norm, Tensor lse, Tensor a,"
                            " Tensor b, float temperature, float margin) -> Tensor",
    "goodness": "goodness(Tensor h, str kind, int skip_tokens) -> Tensor",
    "goodness_backward": "goodness_backward(Tensor grad, Tensor h, str kind, int skip_tokens) -> Tensor",
    # outputs: the loss, the per-sample coefficients its backward needs ([4, B]; [6, B] with SFFA's
    # activity factor) and, with it, (L_S, A) ([2]; empty without it)
    "pair_loss": "pair_loss(Tensor h_pos, Tensor h_neg, str loss, float param, str kind, int skip_tokens,"
                 " bool activity) -> (Tensor, Tensor, Tensor)",
    # activity: pair_loss's (L_S, A), None for the plain loss
    "pair_loss_backward": "pair_loss_backward(Tensor grad, Tensor h_pos, Tensor h_neg, Tensor coef, Tensor? activity,"
                          " str loss, str kind, int skip_tokens) -> (Tensor, Tensor)",
}


def _impl(name):
    def register(fn):
        _lib.define(_SCHEMAS[name])
        for key in ("CPU", "CUDA"):  # CPU: the interpreter (TRITON_INTERPRET=1)
            _lib.impl(name, fn, key)
        return fn

    return register


def _pair_norm(loss: str, batch: int) -> float:
    return 1.0 / batch if loss == "symba" else 0.5 / batch  # mean over B (SymBa) or the 2B values


@_impl("supcon_rows")
def _supcon_rows(x, labels, norm, temperature, margin):
    return SC.supcon_forward(x, labels, x, labels, 0, temperature, margin, norm, norm)


@_impl("supcon_rows_backward")
def _supcon_rows_backward(x, labels, norm, lse, a, b, temperature, margin):
    dx = SC.supcon_backward(x, labels, x, labels, 0, lse, a, b, lse, a, b, temperature, margin, norm, norm)
    return dx.to(x.dtype)


@_impl("goodness")
def _goodness(h, kind, skip_tokens):
    return FG.forward(FG.GOODNESS, h, None, None, kind, skip_tokens)[0]


@_impl("goodness_backward")
def _goodness_backward(grad, h, kind, skip_tokens):
    gscale = FG.goodness_scale(kind, h.shape[-1])
    c = (grad * (2.0 * gscale)).contiguous()  # dg/dhbar_d = 2 gscale hbar_d
    one = torch.ones(1, dtype=c.dtype, device=c.device)
    return FG.backward(h, c, c, one, skip_tokens, h.shape[-1])


def _kept_count(h, skip_tokens: int) -> int:
    """The number of entries the loss reads: B*D, or B*(T - skip)*D for tokens [B, T, D]."""
    return h.shape[0] * h.shape[-1] * (h.shape[1] - skip_tokens if h.dim() == 3 else 1)


@_impl("pair_loss")
def _pair_loss(h_pos, h_neg, loss, param, kind, skip_tokens, activity):
    if activity and loss != "sffa":
        raise ValueError(f"activity: only the sffa loss has the activity factor, got loss={loss!r}")
    terms, coef, _split, _ = FG.forward(FG.LOSS_IDS[loss], h_pos, h_neg, param, kind, skip_tokens, activity)
    plain = terms.sum() * _pair_norm(loss, terms.shape[0])
    if not activity:
        return plain, coef, plain.new_empty(0)
    # mu = sum_b (sum_d hbar_bd) / (B D): the mean of the B T' D kept entries (hbar is their token mean)
    rate = reference.SFFA_ACTIVITY_RATE
    mean_sum = coef[4].sum() / (h_pos.shape[0] * h_pos.shape[-1]) + coef[5].sum() / (h_neg.shape[0] * h_neg.shape[-1])
    factor = 1.0 + torch.exp(-rate * mean_sum)
    return plain * factor, coef, torch.stack([plain, factor])


@_impl("pair_loss_backward")
def _pair_loss_backward(grad, h_pos, h_neg, coef, activity, loss, kind, skip_tokens):
    split = FG.split_of(FG.LOSS_IDS[loss], h_pos.shape[-1])
    scale = (grad.to(coef.dtype) * _pair_norm(loss, h_pos.shape[0])).reshape(1)
    if activity is None:
        return (FG.backward(h_pos, coef[0], coef[1], scale, skip_tokens, split),
                FG.backward(h_neg, coef[2], coef[3], scale, skip_tokens, split))
    # L = L_S A: dL/dh = A dL_S/dh + L_S dA/dmu dmu/dh, dA/dmu = -rate (A - 1), dmu/dh = 1/count
    # on every kept entry: the kernels take [A scale, shift] and add the shift in the same store
    plain, factor = activity[0], activity[1]
    common = grad.to(coef.dtype) * plain * (-reference.SFFA_ACTIVITY_RATE) * (factor - 1.0)
    scaled = scale * factor

    def scales(h):
        return torch.cat([scaled, (common / _kept_count(h, skip_tokens)).reshape(1)])

    return (FG.backward(h_pos, coef[0], coef[1], scales(h_pos), skip_tokens, split, activity=True),
            FG.backward(h_neg, coef[2], coef[3], scales(h_neg), skip_tokens, split, activity=True))


# ---- fake implementations: output shapes and dtypes only ------------------------------------------


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(f"{NAMESPACE}::supcon_rows")
def _supcon_rows_fake(x, labels, norm, temperature, margin):
    n, st = x.shape[0], _stat(x.dtype)
    return (x.new_empty(n, dtype=st), x.new_empty(n, dtype=st), x.new_empty(n, dtype=torch.int32),
            x.new_empty(n, dtype=torch.int32))


@torch.library.register_fake(f"{NAMESPACE}::supcon_rows_backward")
def _supcon_rows_backward_fake(x, labels, norm, lse, a, b, temperature, margin):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{NAMESPACE}::goodness")
def _goodness_fake(h, kind, skip_tokens):
    return h.new_empty(h.shape[0], dtype=_stat(h.dtype))


@torch.library.register_fake(f"{NAMESPACE}::goodness_backward")
def _goodness_backward_fake(grad, h, kind, skip_tokens):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{NAMESPACE}::pair_loss")
def _pair_loss_fake(h_pos, h_neg, loss, param, kind, skip_tokens, activity):
    st = _stat(h_pos.dtype)
    return (h_pos.new_empty((), dtype=st), h_pos.new_empty((6 if activity else 4, h_pos.shape[0]), dtype=st),
            h_pos.new_empty(2 if activity else 0, dtype=st))


@torch.library.register_fake(f"{NAMESPACE}::pair_loss_backward")
def _pair_loss_backward_fake(grad, h_pos, h_neg, coef, activity, loss, kind, skip_tokens):
    return (torch.empty_like(h_pos, memory_format=torch.contiguous_format),
            torch.empty_like(h_neg, memory_format=torch.contiguous_format))


# ---- autograd -------------------------------------------------------------------------------------

_autograd = OperatorAutograd("triton", NAMESPACE)
for _name in ("supcon_rows_backward", "goodness_backward", "pair_loss_backward"):
    _autograd.register_no_derivative(_name)


def _supcon_rows_setup(ctx, inputs, output):
    x, labels, norm, temperature, margin = inputs
    _loss, lse, num_pos, _clipped = output
    ctx.save_for_backward(x, labels, norm, lse, num_pos)
    ctx.temperature, ctx.margin = temperature, margin


def _supcon_rows_grad(ctx, grad_loss, grad_lse, _grad_pos, _grad_clipped):
    """SPEC 1.3: a_i = g_i w_i / tau (+ the lse output's gradient / tau, which enters a_i only,
    since d lse_i / d s_ij = kappa_ij p_ij / tau), b_i = g_i w_i / (tau |P(i)|)."""
    x, labels, norm, lse, num_pos = ctx.saved_tensors
    tau = ctx.temperature
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.to(lse.dtype)
    a, b = backward_coefficients(grad_loss, num_pos, tau)
    if grad_lse is not None:
        a = (a + grad_lse.to(lse.dtype) / tau).contiguous()
    dx = call_backward_op(torch.ops.ffkern_triton.supcon_rows_backward, x, labels, norm, lse, a, b, tau, ctx.margin)
    return dx, None, None, None, None


# Unused outputs get None, not zeros (the loss or lse of a caller that used only the other).
_autograd.register("supcon_rows", _supcon_rows_grad, setup_context=_supcon_rows_setup, materialize_grads=False)


def _goodness_setup(ctx, inputs, output):
    h, kind, skip_tokens = inputs
    ctx.save_for_backward(h)
    ctx.kind, ctx.skip_tokens = kind, skip_tokens


def _goodness_grad(ctx, grad):
    (h,) = ctx.saved_tensors
    return call_backward_op(torch.ops.ffkern_triton.goodness_backward, grad, h, ctx.kind, ctx.skip_tokens), None, None


_autograd.register("goodness", _goodness_grad, setup_context=_goodness_setup)


def _pair_loss_setup(ctx, inputs, output):
    h_pos, h_neg, loss, _param, kind, skip_tokens, activity = inputs
    ctx.save_for_backward(h_pos, h_neg, output[1], output[2])
    ctx.options = (loss, kind, skip_tokens)
    ctx.activity = activity


def _pair_loss_grad(ctx, grad, _grad_coef, _grad_activity):
    if grad is None:  # grads are not materialized (see register): the loss unused
        return None, None, None, None, None, None, None
    h_pos, h_neg, coef, stats = ctx.saved_tensors
    d_pos, d_neg = call_backward_op(torch.ops.ffkern_triton.pair_loss_backward, grad, h_pos, h_neg, coef,
                                    stats if ctx.activity else None, *ctx.options)
    return d_pos, d_neg, None, None, None, None, None


# coef and the activity statistics are saved for the backward: their gradients are never written.
_autograd.register("pair_loss", _pair_loss_grad, setup_context=_pair_loss_setup, materialize_grads=False)
