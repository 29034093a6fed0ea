"""Linear layers whose CPU forward adds the bias inside the matrix product (oneDNN), not before it.

``F.linear`` on the CPU is addmm: it first broadcasts the bias into the whole output [N, M] (one
write of the output), then runs the GEMM with beta = 1 (one more read of it). For the ViT's token
matrices (N = batch * tokens = 65536 rows in a CFF step) that copy was 44 ms of a 690 ms block
step on one core, 6% (benchmarks/NOTES.md, "End to end"). oneDNN's linear
(torch.ops.mkldnn._linear_pointwise, the kernel inductor itself calls for CPU linears) adds the
bias in the GEMM's epilogue: 42 ms instead of 55 ms for [65536, 128] x [128, 384] on one core.

The backward is linear's own (dx = g W, dW = g^T x, db = sum of g, all differentiable torch ops,
so double backward works) and forward-mode AD has its rule (jvp). The fast path is taken only
where it pays and is safe: fp32 CPU tensors, an output of at least ``MIN_OUTPUT_ELEMENTS``, no
autocast, not under torch.compile (inductor fuses linears itself), oneDNN present. Everything else
is plain ``F.linear``. Parameters, names and initialization are nn.Linear's: state dicts load
either way, and a seeded model has the same weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below this many output elements the bias copy is cheap and oneDNN's per-call set-up is not
# (measured: [64, 64] -> 10 is 4x slower through oneDNN; [512, 784] -> 500 the same speed).
MIN_OUTPUT_ELEMENTS = 1 << 20


_ONEDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile cannot trace the query


def _fast_path(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    if torch.compiler.is_compiling() or not _ONEDNN:
        return False
    # anything unusual (other dtypes or devices, a shape mismatch, a strided weight) is F.linear's,
    # with its own errors
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
            and x.dim() >= 2 and x.shape[-1] == weight.shape[1]
            and x.numel() // max(x.shape[-1], 1) * weight.shape[0] >= MIN_OUTPUT_ELEMENTS
            and not torch.is_autocast_enabled("cpu"))


class _BiasInGemmLinear(torch.autograd.Function):
    @staticmethod
    def forward(x2d, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")

    @staticmethod
    def setup_context(ctx, inputs, output):
        x2d, weight, bias = inputs
        ctx.save_for_backward(x2d, weight)
        ctx.save_for_forward(x2d, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x2d, weight = ctx.saved_tensors
        dx = grad.mm(weight) if ctx.needs_input_grad[0] else None
        dw = grad.t().mm(x2d) if ctx.needs_input_grad[1] else None
        db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db

    @staticmethod
    def jvp(ctx, dx, dw, db):
        x2d, weight = ctx.saved_tensors
        out = None
        for term in (None if dx is None else dx.mm(weight.t()), None if dw is None else x2d.mm(dw.t()), db):
            if term is not None:
                out = term if out is None else out + term
        return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, with the bias added inside the product on the CPU where that
    is faster (see the module's docstring); the same values to the rounding of the addition."""
    if not _fast_path(x, weight, bias):
        return F.linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    return _BiasInGemmLinear.apply(x2d, weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear whose forward is ``linear`` above (same parameters, initialization, state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
