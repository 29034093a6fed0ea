"""Multi-head self-attention for the ViT blocks: nn.MultiheadAttention's parameters and
initialization, with less memory traffic around the attention kernel.

nn.MultiheadAttention (batch_first, need_weights=False) reaches the same fused
scaled_dot_product_attention kernel, but on the way it transposes the input to sequence-first,
splits q, k, v with copies and, in backward, scatters their gradients into zero-filled buffers;
on a CPU those copies and fills were a fifth of a ViT block's step (benchmarks/NOTES.md, "End to
end"). Here q, k, v are strided views of the one input projection and only the attention's output
is made contiguous. The parameter names, shapes and the order of the random draws at
initialization are nn.MultiheadAttention's, so a seeded model has bit-identical weights and state
dicts load either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_linear import Linear, linear


def _packed_path(qkv: torch.Tensor) -> bool:
    return (qkv.device.type == "cpu" and qkv.dtype == torch.float32 and qkv.requires_grad
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _PackedCpuAttention(torch.autograd.Function):
    """SDPA's CPU flash kernel on q, k, v taken from one packed projection [B, T, 3, H, d], with
    the gradient written back in that packed layout in one pass. Through autograd's own graph the
    three gradients are stacked as [3, B, H, T, d] and then copied again into the packed layout
    (a stack and a clone of the whole projection: 32 ms of a 620 ms ViT block step on one core).
    The values are SDPA's (the same kernel, forward and backward); first order only, as that
    kernel's backward is."""

    @staticmethod
    def forward(ctx, qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        ctx.save_for_backward(qkv, o, lse)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_o):
        qkv, o, lse = ctx.saved_tensors
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_o, q, k, v, o, lse, 0.0, False)
        return torch.stack([g.transpose(1, 2) for g in grads], 2)  # [B, T, 3, H, d]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width E={dim} must be divisible by the number of heads H={heads}")
        self.dim, self.heads = dim, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = Linear(dim, dim)  # nn.Linear; draws its weight and bias here, as in nn.MultiheadAttention
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, E] -> [B, T, E]."""
        b, t, e = x.shape
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias).view(b, t, 3, self.heads, e // self.heads)
        if _packed_path(qkv):
            o = _PackedCpuAttention.apply(qkv)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d], views
            o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, e))  # o is [B, T, H, d] in memory: a view

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"


class StockSelfAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention called as SelfAttention is (x -> attention output): the plain-PyTorch
    block that SelfAttention replaces, kept for the conformance test and as the "paper-style" side
    of the end-to-end benchmark. Same parameter names, so state dicts load either way."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, x, x, need_weights=False)[0]
