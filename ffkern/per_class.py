"""Per-class goodness loss for convolutional layers (SPEC 2.2; the Scalable-FF idea, Krutsylo 2025).

A 1x1 convolution with K output channels (one per class) reads a block's output h [B, C, H, W];
the goodness of class k is the spatial mean of squares of channel k; the loss is the softmax
cross-entropy of ``scale`` times those K goodness values against the label. One forward pass,
no label in the input: the true class is the positive, the other K - 1 classes the negatives.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ._backend import BackendUnavailable, check_backend_name, resolve
from ._checks import REDUCTIONS, check_choice, check_float_tensor


def _impl(backend: str, device: torch.device):
    """The backend object that computes the loss. No fused kernel exists yet for this loss (only
    the reference has one): "auto" uses the reference on every device; a backend named explicitly
    must have the kernel (the attribute ``per_class_loss``), else BackendUnavailable says so, so
    that asking for a fast path never silently runs the slow one."""
    check_backend_name(backend)
    if backend == "auto":
        return resolve("reference", device)
    impl = resolve(backend, device)  # raises BackendUnavailable if it cannot run here at all
    if not hasattr(impl, "per_class_loss"):
        raise BackendUnavailable(f"backend {backend!r} has no per-class goodness kernel yet; use backend='auto' or"
                                 f" 'reference' (the reference implementation, which 'auto' uses on every device)")
    return impl


def _check(h, weight, bias, labels=None):
    check_float_tensor("h", h)
    check_float_tensor("weight", weight)
    if h.dim() != 4:
        raise ValueError(f"h must be a feature map [B, C, H, W], got shape {list(h.shape)}")
    if weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1) or weight.dim() not in (2, 4):
        raise ValueError(f"weight must be [K, C] or a 1x1 conv weight [K, C, 1, 1], got shape {list(weight.shape)}")
    k, c = weight.shape[0], weight.shape[1]
    if c != h.shape[1]:
        raise ValueError(f"weight has {c} input channels but h has C={h.shape[1]}")
    if k < 2:
        raise ValueError(f"the per-class loss needs K >= 2 classes (output channels of weight), got {k}")
    if weight.device != h.device:
        raise ValueError(f"weight is on {weight.device} but h on {h.device}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (k,):
            raise ValueError(f"bias must have shape [K] = [{k}], got {list(bias.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
            raise TypeError("labels must be an int32/int64 tensor [B]")
        if tuple(labels.shape) != (h.shape[0],):
            raise ValueError(f"labels must have shape [B] = [{h.shape[0]}], got {list(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"labels must lie in [0, K) = [0, {k}), got values in [{int(labels.min())}, {int(labels.max())}]")


def _check_scale(scale):
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a one-element tensor, got shape {list(scale.shape)}")
        return scale.reshape(())
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def class_goodness(h: torch.Tensor, weight: torch.Tensor, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """Class goodness ``[B, K]``: g_bk = mean over positions of (1x1 conv of h with weight, + bias)_k^2.

    h: [B, C, H, W], contiguous or channels-last; weight: [K, C] or [K, C, 1, 1]. Backends as
    for per_class_goodness_loss (today: the reference on every device)."""
    _check(h, weight, bias)
    return _impl(backend, h.device).class_goodness(h, weight, bias)


def per_class_goodness_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias=None,
                            scale=1.0, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """SPEC 2.2: L_b = logsumexp_k(s g_bk) - s g_b,y_b with g = class_goodness(h, weight, bias),
    s = ``scale`` (a number, or a one-element tensor such as a learned temperature, which gets a
    gradient); reduction "mean" (default), "sum" or "none" ([B]).

    Differentiable in h, weight, bias and a tensor scale. Computed in float32 (float64 stays
    float64), also inside autocast. Backends: only the reference implements this loss so far (no
    fused Triton or C++ kernel yet): backend="auto" runs it on every device; backend="reference"
    likewise; backend="triton" or "cpp" named explicitly raises BackendUnavailable."""
    _check(h, weight, bias, labels)
    check_choice("reduction", reduction, REDUCTIONS)
    return _impl(backend, h.device).per_class_loss(h, weight, labels, bias, _check_scale(scale), reduction)


class PerClassGoodnessLoss(nn.Module):
    """The per-class head of one block: its own 1x1 conv ``proj`` (C -> K, initialized as
    nn.Conv2d is) and scale, trained with the block. ``criterion(h, labels)`` is the loss;
    ``criterion.logits(h)`` the scaled class goodness [B, K] that prediction averages over blocks.

    learnable_scale=True learns log(scale) (the scale stays positive), starting from ``scale``."""

    def __init__(self, in_channels: int, num_classes: int, *, scale: float = 1.0, learnable_scale: bool = False,
                 bias: bool = False, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        _check_scale(scale)
        check_choice("reduction", reduction, REDUCTIONS)
        check_backend_name(backend)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.proj = nn.Conv2d(in_channels, num_classes, 1, bias=bias)
        log_scale = torch.tensor(math.log(scale))
        if learnable_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.reduction, self.backend = reduction, backend

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def goodness(self, h: torch.Tensor) -> torch.Tensor:
        return class_goodness(h, self.proj.weight, self.proj.bias, backend=self.backend)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.goodness(h)

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_class_goodness_loss(h, self.proj.weight, labels, bias=self.proj.bias, scale=self.scale,
                                       reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        learned = isinstance(self.log_scale, nn.Parameter)
        return f"scale={'learned' if learned else format(float(self.scale), 'g')}"
