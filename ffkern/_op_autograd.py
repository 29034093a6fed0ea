"""Autograd of the compiled backends' operators (torch.ops.ffkern::* of "cpp",
torch.ops.ffkern_triton::* of "triton"): first-order reverse mode, and a clear refusal of the rest.

Each backend defines its operators with a schema (so that torch.compile(fullgraph=True) treats
them as opaque calls with fake implementations) and registers here the backward formula of each
(the cpp backend's fused FF operators excepted: their autograd is C++, csrc/ff_autograd.cpp, with
the same refusals and messages, as a Python Autograd kernel costs ~10 us on every call).
Only first-order reverse mode (loss.backward(), torch.autograd.grad) is implemented. The other
modes would otherwise go wrong silently or with a message about torch internals, so each operator
refuses them with one naming ffkern, the backend and the public function:
  - double backward (create_graph=True): the backward formulas call the *_backward operators,
    whose registered autograd raises when something is differentiated through them (only then:
    create_graph=True whose gradient is merely used as a value still works);
  - forward-mode AD (torch.func.jvp, torch.autograd.forward_ad): torch's generated autograd kernel
    passes dual tensors to the kernels below autograd, which drop the tangent (a zero tangent, no
    warning); the kernel is wrapped to raise when an input carries a tangent;
  - torch.func.grad/vjp/jacrev: the generated kernel is an autograd.Function without
    setup_context, which torch.func rejects with a message that names neither ffkern nor a fix.
torch.func.vmap works: PyTorch's batching fallback runs the operator once per batch entry.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

# The public function behind each operator name, for the error messages.
_PAIR_FUNCTIONS = {"ff": "ff_loss", "symba": "symba_loss", "sffa": "sffa_loss"}


def public_function(name: str, args) -> str:
    if name.startswith("supcon"):
        return "marginal_supcon_loss"
    if name.startswith("goodness"):
        return "ff_goodness"
    loss = next((a for a in args if isinstance(a, str) and a in _PAIR_FUNCTIONS), None)
    return _PAIR_FUNCTIONS.get(loss, "the FF pair losses")


def _fallback_hint(name: str) -> str:
    return "use backend='reference'" + ("" if name.endswith("_backward") else " (plain PyTorch, supports every mode)")


def refuse_unsupported_modes(backend: str, namespace: str, name: str, args) -> None:
    """Raises for the autodiff modes the operators do not implement (see above); inputs that do not
    depend on the differentiated variable (no tangent, no requires_grad) are not refused."""
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() if hasattr(functorch, "get_interpreter_stack") else None
    if not stack and getattr(fwAD, "_current_level", 0) < 0:
        # no forward-AD level entered (a dual tensor exists only inside one; torch.func.jvp enters
        # one or pushes a functorch interpreter) and no torch.func transform: nothing to refuse.
        # The common case, checked in ~0.5 us instead of a tangent lookup per tensor.
        return
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            f"ffkern: backend '{backend}' does not support forward-mode AD (torch.func.jvp, torch.func.jacfwd, "
            f"torch.autograd.forward_ad) of {public_function(name, args)} (operator {namespace}::{name}); "
            f"{_fallback_hint(name)}")
    if stack and any(t.requires_grad for t in tensors) and any(i.key() == functorch.TransformType.Grad for i in stack):
        raise RuntimeError(
            f"ffkern: backend '{backend}' does not support torch.func.grad/vjp/jacrev/hessian of "
            f"{public_function(name, args)} (operator {namespace}::{name}); use torch.autograd.grad or "
            f"loss.backward(), or {_fallback_hint(name)}")


def call_backward_op(op, *args):
    """A *_backward operator from inside a backward formula. Under create_graph=True (grad mode on)
    through its autograd kernel, which refuses double backward; otherwise straight to the kernel
    below autograd: the Python autograd kernel would only find nothing to record and redispatch,
    ~8 us a call (a tenth of a small FF loss's fwd+bwd)."""
    if torch.is_grad_enabled():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _without_materialized_grads(setup_context):
    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        if setup_context is not None:
            setup_context(ctx, inputs, output)
    return setup


class OperatorAutograd:
    """Registers the Autograd kernels of one backend's operators (namespace::name)."""

    def __init__(self, backend: str, namespace: str):
        self.backend, self.namespace = backend, namespace
        self._lib = torch.library.Library(namespace, "FRAGMENT")  # kept alive: it owns the kernels

    def register(self, name: str, backward, setup_context=None, materialize_grads: bool = True) -> None:
        """torch.library.register_autograd, plus the checks of refuse_unsupported_modes in front of
        torch's generated kernel (which register_autograd offers no hook for).

        materialize_grads=False: the backward receives None, not a tensor of zeros, for an output
        whose gradient is undefined (a saved statistic marked non-differentiable, or a result the
        caller did not use); autograd otherwise writes a zero tensor of every such output per call
        (the [B, D] token means of the FF ops, ~5 % of their backward, before their autograd moved to
        C++; now SupCon's unused loss or lse output)."""
        qualname = f"{self.namespace}::{name}"
        if not materialize_grads:
            setup_context = _without_materialized_grads(setup_context)
        try:
            from torch._library.autograd import Info, make_autograd_impl
        except ImportError:  # a torch without that internal: plain registration, modes not refused
            torch.library.register_autograd(qualname, backward, setup_context=setup_context)
            return
        op = getattr(getattr(torch.ops, self.namespace), name).default
        kernel = make_autograd_impl(op, Info(backward, setup_context))
        backend, namespace = self.backend, self.namespace

        def checked_kernel(keyset, *args, **kwargs):
            refuse_unsupported_modes(backend, namespace, name, args)
            return kernel(keyset, *args, **kwargs)

        self._lib.impl(name, checked_kernel, "Autograd", with_keyset=True)

    def register_no_derivative(self, name: str) -> None:
        """An operator with no derivative: raises when autograd reaches it, i.e. when something is
        differentiated through it (for the *_backward operators: double backward)."""
        backend, namespace = self.backend, self.namespace

        def setup_context(ctx, inputs, output):
            ctx.function = public_function(name, inputs)

        def backward(ctx, *grads):
            if name.endswith("_backward"):
                raise RuntimeError(
                    f"ffkern: backend '{backend}' does not support double backward (create_graph=True) of "
                    f"{ctx.function} (its gradient is computed by operator {namespace}::{name}, which has no "
                    f"derivative); use backend='reference'")
            raise RuntimeError(
                f"ffkern: backend '{backend}': operator {namespace}::{name} has no derivative (it is a primitive "
                f"of {ctx.function}, which differentiates through {namespace}::supcon_rows)")

        self.register(name, backward, setup_context)
