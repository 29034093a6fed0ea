"""What the Triton backend's autograd Functions do outside first-order reverse mode.

They implement loss.backward() / torch.autograd.grad. With create_graph=True the gradient they
return would otherwise be a constant (no grad_fn), so a gradient penalty built on it would be
silently dropped; instead the gradient is wrapped so that differentiating it raises, naming
ffkern, the backend and the loss. Forward mode and torch.func transforms are refused by torch
itself for these Functions (no jvp, no setup_context), with torch's own message.
"""
from __future__ import annotations

import torch


class _RefuseDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, function, source):
        ctx.function = function
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"ffkern: backend 'triton' does not support double backward (create_graph=True, then "
                           f"differentiating the gradient) of {ctx.function}; use backend='reference'")


def first_order_only(grad: torch.Tensor | None, function: str, source: torch.Tensor):
    """grad as it is, or (under create_graph=True) a view whose backward raises. source is the
    saved input the gradient is a function of: through it the view joins the graph."""
    if grad is None or not torch.is_grad_enabled() or not source.requires_grad:
        return grad
    return _RefuseDoubleBackward.apply(grad, function, source)
