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


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width E={dim} must be divisible by the number of heads H={heads}")
        self.dim, self.heads = dim, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)  # draws its weight and bias here, as in nn.MultiheadAttention
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, E] -> [B, T, E]."""
        b, t, e = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, t, 3, self.heads, e // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d], views
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, e))

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
