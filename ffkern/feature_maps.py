"""Convolutional feature maps ``[B, C, H, W]`` as the ``[B, D]`` / ``[B, T, D]`` inputs of the
goodness losses (SPEC 2.1), as views: no copy for a contiguous or a channels-last map.

- ``flat_features(h)``: ``[B, C*H*W]``. The goodness mean_d h_d^2 over it is the Trifecta's
  goodness (mean of squares over C, H and W); a sum of squares does not depend on the order of
  the elements, so a channels-last map is flattened in its own memory order (H, W, C).
- ``channel_tokens(h)``: ``[B, H*W, C]``, one token per position, D = C. For SFFA, whose halves
  are the first and the second half of the D features: on a conv map the halves are channels
  0..C/2-1 and C/2..C-1 whatever the memory layout. Token inputs are pooled before squaring
  (SPEC 2), so SFFA's energies on a conv map are those of the spatially averaged channels.
"""
from __future__ import annotations

import torch


def _check_map(h: torch.Tensor) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() != 4:
        shape = list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"expected a feature map [B, C, H, W], got {shape}")


def is_channels_last(h: torch.Tensor) -> bool:
    """True for a map stored as [B, H, W, C] in memory and not also plainly contiguous (with
    C = 1 or H = W = 1 both hold; the plain view is then taken, which is the same memory)."""
    return not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)


def flat_features(h: torch.Tensor) -> torch.Tensor:
    """``[B, C*H*W]`` view of a contiguous map, ``[B, H*W*C]`` view of a channels-last one (same
    data pointer, no copy); any other stride pattern is copied by reshape."""
    _check_map(h)
    b = h.shape[0]
    if h.is_contiguous():
        return h.view(b, -1)
    if is_channels_last(h):
        return h.permute(0, 2, 3, 1).view(b, -1)  # [B, H, W, C] is contiguous here
    return h.reshape(b, -1)


def channel_tokens(h: torch.Tensor) -> torch.Tensor:
    """``[B, H*W, C]``: positions as tokens, channels as features. A view of a contiguous map
    (strides C*H*W, 1, H*W) and a contiguous view of a channels-last one; no copy either way."""
    _check_map(h)
    b, c = h.shape[0], h.shape[1]
    return h.permute(0, 2, 3, 1).reshape(b, -1, c)
