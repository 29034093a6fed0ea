"""Autograd for the fused backends, built on their two primitives (see ffkern._backend):
forward writes per-row statistics, backward recomputes similarity tiles from them (SPEC 1.3)."""
from __future__ import annotations

import torch


def backward_coefficients(grad_rows: torch.Tensor, num_pos: torch.Tensor, temperature: float):
    """a_i = g_i w_i / tau and b_i = a_i / |P(i)| of SPEC 1.3 (w_i = 0 for anchors without positives)."""
    a = torch.where(num_pos > 0, grad_rows / temperature, torch.zeros_like(grad_rows))
    b = a / num_pos.clamp(min=1).to(a.dtype)
    return a.contiguous(), b.contiguous()


class SupConRows(torch.autograd.Function):
    """(z [N, D], labels [N]) -> per-anchor loss L [N], with |P(i)| and clipped counts as
    non-differentiable outputs. Memory O(N * D): only per-row statistics are saved."""

    @staticmethod
    def forward(ctx, z, labels, temperature, margin, impl, operand_dtype):
        zo = z.to(operand_dtype).contiguous()
        loss, lse, num_pos, num_clipped = impl.supcon_forward(zo, labels, zo, labels, 0, temperature, margin)
        ctx.save_for_backward(zo, labels, lse, num_pos)
        ctx.temperature, ctx.margin, ctx.impl, ctx.z_dtype = temperature, margin, impl, z.dtype
        ctx.mark_non_differentiable(num_pos, num_clipped)
        return loss, num_pos, num_clipped

    @staticmethod
    def backward(ctx, grad_loss, _grad_pos, _grad_clipped):
        zo, labels, lse, num_pos = ctx.saved_tensors
        a, b = backward_coefficients(grad_loss.to(lse.dtype), num_pos, ctx.temperature)
        dz = ctx.impl.supcon_backward(zo, labels, zo, labels, 0, lse, a, b, lse, a, b, ctx.temperature, ctx.margin)
        return dz.to(ctx.z_dtype), None, None, None, None, None
