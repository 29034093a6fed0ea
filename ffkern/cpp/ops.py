"""Python registrations of the ffkern::* operators: fake (meta) implementations, so that the ops
trace under torch.compile(fullgraph=True), and autograd formulas (torch.library.register_autograd).

The C++ schemas name this module (m.set_python_module("ffkern.cpp.ops")). Importing it loads the
compiled library first (building it if needed; see ffkern.cpp.build).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

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


@torch.library.register_fake("ffkern::goodness")
def _goodness_fake(h, kind, skip_tokens):
    return h.new_empty(h.shape[0], dtype=_compute_dtype(h.dtype))


@torch.library.register_fake("ffkern::goodness_backward")
def _goodness_backward_fake(grad, h, kind, skip_tokens):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.register_fake("ffkern::pair_loss")
def _pair_loss_fake(h_pos, h_neg, loss, param, kind, skip_tokens):
    return h_pos.new_empty((), dtype=_compute_dtype(h_pos.dtype))


@torch.library.register_fake("ffkern::pair_loss_backward")
def _pair_loss_backward_fake(grad, h_pos, h_neg, loss, param, kind, skip_tokens):
    return (torch.empty_like(h_pos, memory_format=torch.contiguous_format),
            torch.empty_like(h_neg, memory_format=torch.contiguous_format))


# ---- autograd ---------------------------------------------------------------------------------------
#
# Only first-order reverse mode (loss.backward(), torch.autograd.grad) is implemented. The other
# modes would otherwise go wrong silently or with a message about torch internals, so each operator
# refuses them with one naming ffkern, the backend and the public function:
#   - double backward (create_graph=True): the backward formulas call the *_backward operators;
#     their registered autograd raises when something is differentiated through them (only then:
#     create_graph=True whose gradient is merely used as a value still works);
#   - forward-mode AD (torch.func.jvp, torch.autograd.forward_ad): torch's generated autograd
#     kernel passes dual tensors to the kernels below autograd, which drop the tangent (a zero
#     tangent, no warning); the kernel is wrapped to raise when an input carries a tangent;
#   - torch.func.grad/vjp/jacrev: the generated kernel is an autograd.Function without
#     setup_context, which torch.func rejects with a message that names neither ffkern nor a fix.
# torch.func.vmap works: PyTorch's batching fallback runs the operator once per batch entry.

# The public function behind each operator, for the error messages.
_PAIR_FUNCTIONS = {"ff": "ff_loss", "symba": "symba_loss", "sffa": "sffa_loss"}


def public_function(name: str, args) -> str:
    if name.startswith("supcon"):
        return "marginal_supcon_loss"
    if name.startswith("goodness"):
        return "ff_goodness"
    loss = args[2] if name == "pair_loss" else args[3]  # pair_loss_backward has grad first
    return _PAIR_FUNCTIONS.get(loss, "the FF pair losses")


def _fallback_hint(name: str) -> str:
    return "use backend='reference'" + ("" if name.endswith("_backward") else " (plain PyTorch, supports every mode)")


def refuse_unsupported_modes(name: str, args) -> None:
    """Raises for the autodiff modes the operators do not implement (see above); inputs that do not
    depend on the differentiated variable (no tangent, no requires_grad) are not refused."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            f"ffkern: backend 'cpp' does not support forward-mode AD (torch.func.jvp, torch.func.jacfwd, "
            f"torch.autograd.forward_ad) of {public_function(name, args)} (operator ffkern::{name}); "
            f"{_fallback_hint(name)}")
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() if hasattr(functorch, "get_interpreter_stack") else None
    if stack and any(t.requires_grad for t in tensors) and any(i.key() == functorch.TransformType.Grad for i in stack):
        raise RuntimeError(
            f"ffkern: backend 'cpp' does not support torch.func.grad/vjp/jacrev/hessian of "
            f"{public_function(name, args)} (operator ffkern::{name}); use torch.autograd.grad or "
            f"loss.backward(), or {_fallback_hint(name)}")


_lib = torch.library.Library("ffkern", "FRAGMENT")  # kept alive: it owns the Autograd kernels


def _register_autograd(name: str, backward, setup_context=None) -> None:
    """torch.library.register_autograd, plus the checks of refuse_unsupported_modes in front of
    torch's generated kernel (which register_autograd offers no hook for)."""
    try:
        from torch._library.autograd import Info, make_autograd_impl
    except ImportError:  # a torch without that internal: plain registration, modes not refused
        torch.library.register_autograd(f"ffkern::{name}", backward, setup_context=setup_context)
        return
    kernel = make_autograd_impl(getattr(torch.ops.ffkern, name).default, Info(backward, setup_context))

    def checked_kernel(keyset, *args, **kwargs):
        refuse_unsupported_modes(name, args)
        return kernel(keyset, *args, **kwargs)

    _lib.impl(name, checked_kernel, "Autograd", with_keyset=True)


def _no_derivative(name: str):
    """(backward, setup_context) for an operator with no derivative: raises when autograd reaches
    it, i.e. when something is differentiated through it."""

    def setup_context(ctx, inputs, output):
        ctx.function = public_function(name, inputs)

    def backward(ctx, *grads):
        if name.endswith("_backward"):
            raise RuntimeError(
                f"ffkern: backend 'cpp' does not support double backward (create_graph=True) of {ctx.function} "
                f"(its gradient is computed by operator ffkern::{name}, which has no derivative); "
                f"use backend='reference'")
        raise RuntimeError(
            f"ffkern: backend 'cpp': operator ffkern::{name} has no derivative (it is a primitive of "
            f"{ctx.function}, which differentiates through ffkern::supcon_rows)")

    return backward, setup_context


for _name in ("supcon_forward", "supcon_backward", "goodness_backward", "pair_loss_backward"):
    _register_autograd(_name, *_no_derivative(_name))


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
    dz = torch.ops.ffkern.supcon_backward(zq, labels, zq, labels, 0, lse, a, b, lse, a, b, tau, ctx.margin)
    return dz.to(z.dtype), None, None, None, None


_register_autograd("supcon_rows", _supcon_rows_backward, setup_context=_supcon_rows_setup)


def _goodness_setup(ctx, inputs, output):
    h, kind, skip_tokens = inputs
    ctx.save_for_backward(h)
    ctx.kind, ctx.skip_tokens = kind, skip_tokens


def _goodness_backward(ctx, grad):
    (h,) = ctx.saved_tensors
    return torch.ops.ffkern.goodness_backward(grad, h, ctx.kind, ctx.skip_tokens), None, None


_register_autograd("goodness", _goodness_backward, setup_context=_goodness_setup)


def _pair_loss_setup(ctx, inputs, output):
    h_pos, h_neg, loss, param, kind, skip_tokens = inputs
    ctx.save_for_backward(h_pos, h_neg)
    ctx.options = (loss, param, kind, skip_tokens)


def _pair_loss_backward(ctx, grad):
    h_pos, h_neg = ctx.saved_tensors
    d_pos, d_neg = torch.ops.ffkern.pair_loss_backward(grad, h_pos, h_neg, *ctx.options)
    return d_pos, d_neg, None, None, None, None


_register_autograd("pair_loss", _pair_loss_backward, setup_context=_pair_loss_setup)
