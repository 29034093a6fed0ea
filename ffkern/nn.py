"""Thin nn.Module wrappers around the functional losses.

Each module takes the options of its function, checks them at construction (a bad option fails
where it is written, not at the first call; the tensors' checks and the backend's availability on
their device come at the call), and passes them on. Keyword arguments at the call override them.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ._backend import check_backend_name
from .ff_losses import check_alpha, check_options, check_threshold, ff_loss, sffa_loss, symba_loss
from .marginal_supcon import check_options as check_supcon_options
from .marginal_supcon import marginal_supcon_loss


def _check_group(group):
    """Its type only: whether this process belongs to it and its backend fits the features'
    device are checked at the call (ffkern.distributed.check_group)."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("group: torch.distributed is not available in this PyTorch build")
    if not isinstance(group, dist.ProcessGroup) and group != dist.GroupMember.NON_GROUP_MEMBER:
        raise TypeError("group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD or one"
                        f" from torch.distributed.new_group), or None for a single process; got {type(group).__name__}")
    return group


class MarginalSupConLoss(nn.Module):
    """``criterion(features, labels=None)`` with the options of ffkern.marginal_supcon_loss fixed
    at construction; a drop-in for CFF's ``SupMCon``: ``criterion([x1.mean(1), x2.mean(1)], targets)``."""

    def __init__(self, temperature: float = 0.15, margin: float = 0.0, *, reduction: str = "mean",
                 normalize: bool = True, base_temperature: Optional[float] = None, backend: str = "auto",
                 group=None, return_stats: bool = False):
        super().__init__()
        self.temperature, self.margin, self.base_temperature = check_supcon_options(
            temperature, margin, reduction, normalize, base_temperature, return_stats)
        self.reduction, self.normalize, self.return_stats = reduction, normalize, return_stats
        self.backend, self.group = check_backend_name(backend), _check_group(group)

    def forward(self, features, labels=None, **overrides):
        options = dict(temperature=self.temperature, margin=self.margin, reduction=self.reduction,
                       normalize=self.normalize, base_temperature=self.base_temperature, backend=self.backend,
                       group=self.group, return_stats=self.return_stats)
        options.update(overrides)
        return marginal_supcon_loss(features, labels, **options)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, margin={self.margin}, reduction={self.reduction!r}, backend={self.backend!r}"


class _PairLoss(nn.Module):
    def __init__(self, *, kind: str = "mean", skip_tokens: int = 0, backend: str = "auto"):
        super().__init__()
        check_options(kind, skip_tokens)
        self.kind, self.skip_tokens, self.backend = kind, int(skip_tokens), check_backend_name(backend)

    def _options(self, overrides):
        return {**dict(kind=self.kind, skip_tokens=self.skip_tokens, backend=self.backend), **overrides}

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, skip_tokens={self.skip_tokens}, backend={self.backend!r}"


class FFLoss(_PairLoss):
    """``criterion(h_pos, h_neg)``: ffkern.ff_loss with its options fixed at construction."""

    def __init__(self, threshold: float = 2.0, **options):
        super().__init__(**options)
        self.threshold = check_threshold(threshold)

    def forward(self, h_pos, h_neg, **overrides):
        return ff_loss(h_pos, h_neg, **self._options({"threshold": self.threshold, **overrides}))


class SymBaLoss(_PairLoss):
    """``criterion(h_pos, h_neg)``: ffkern.symba_loss with its options fixed at construction."""

    def __init__(self, alpha: float = 4.0, **options):
        super().__init__(**options)
        self.alpha = check_alpha(alpha)

    def forward(self, h_pos, h_neg, **overrides):
        return symba_loss(h_pos, h_neg, **self._options({"alpha": self.alpha, **overrides}))


class SFFALoss(_PairLoss):
    """``criterion(h_pos, h_neg)``: ffkern.sffa_loss with its options fixed at construction."""

    def forward(self, h_pos, h_neg, **overrides):
        return sffa_loss(h_pos, h_neg, **self._options(overrides))
