"""The per-row coefficients of the symmetric backward of SPEC 1.3, shared by the fused backends
and the distributed loss (which all-gathers them)."""
from __future__ import annotations

import torch


def backward_coefficients(grad_rows: torch.Tensor, num_pos: torch.Tensor, temperature: float):
    """a_i = g_i w_i / tau and b_i = a_i / |P(i)| of SPEC 1.3 (w_i = 0 for anchors without positives)."""
    a = torch.where(num_pos > 0, grad_rows / temperature, torch.zeros_like(grad_rows))
    b = a / num_pos.clamp(min=1).to(a.dtype)
    return a.contiguous(), b.contiguous()
