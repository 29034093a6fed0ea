"""Thin nn.Module wrappers around the functional losses."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .ff_losses import ff_loss, sffa_loss, symba_loss
from .marginal_supcon import marginal_supcon_loss


class MarginalSupConLoss(nn.Module):
    """``criterion(features, labels=None)`` with the options fixed at construction; a drop-in for
    CFF's ``SupMCon``: ``criterion([x1.mean(1), x2.mean(1)], targets)``."""

    def __init__(self, temperature: float = 0.15, margin: float = 0.0, *, reduction: str = "mean",
                 normalize: bool = True, base_temperature: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        self.temperature, self.margin, self.reduction = temperature, margin, reduction
        self.normalize, self.base_temperature, self.backend = normalize, base_temperature, backend

    def forward(self, features, labels=None, **overrides):
        options = dict(temperature=self.temperature, margin=self.margin, reduction=self.reduction,
                       normalize=self.normalize, base_temperature=self.base_temperature, backend=self.backend)
        options.update(overrides)
        return marginal_supcon_loss(features, labels, **options)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, margin={self.margin}, reduction={self.reduction!r}, backend={self.backend!r}"


class _PairLoss(nn.Module):
    def __init__(self, *, kind: str = "mean", skip_tokens: int = 0, backend: str = "auto"):
        super().__init__()
        self.kind, self.skip_tokens, self.backend = kind, skip_tokens, backend

    def _options(self):
        return dict(kind=self.kind, skip_tokens=self.skip_tokens, backend=self.backend)


class FFLoss(_PairLoss):
    def __init__(self, threshold: float = 2.0, **options):
        super().__init__(**options)
        self.threshold = threshold

    def forward(self, h_pos, h_neg):
        return ff_loss(h_pos, h_neg, threshold=self.threshold, **self._options())


class SymBaLoss(_PairLoss):
    def __init__(self, alpha: float = 4.0, **options):
        super().__init__(**options)
        self.alpha = alpha

    def forward(self, h_pos, h_neg):
        return symba_loss(h_pos, h_neg, alpha=self.alpha, **self._options())


class SFFALoss(_PairLoss):
    def forward(self, h_pos, h_neg):
        return sffa_loss(h_pos, h_neg, **self._options())
