"""What each method feeds the first layer and what each layer's loss is (SPEC 3).

  cff    views of the batch (V = 2, or 1 in one-forward mode) -> marginal SupCon loss of the pooled
         output of every layer, with that layer's margin; stage 2: a linear head (methods' heads
         are in heads.py)
  ff     label embedded in the input; positives = true label, negatives = the same image with a
  symba  wrong label; each layer minimizes the goodness loss of its output (ffkern.ff_loss,
  sffa   symba_loss, sffa_loss); prediction tries every label (or a linear head)
  bp     end-to-end cross-entropy (trained in bp.py, not layer by layer)

A ``LayerBatch`` is everything a layer needs: rows of activations and the sample labels. It is
what one layer hands to the next, so a pipeline stage can receive it from another process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .. import ff_goodness, ff_loss, marginal_supcon_loss, sffa_loss, symba_loss
from . import rng
from .data import Augment, make_views
from .models import Encoder

METHODS = ("cff", "ff", "symba", "sffa", "bp")
FF_FAMILY = ("ff", "symba", "sffa")


@dataclass
class LayerBatch:
    """Activations ``h`` of one batch at a layer boundary, with the sample labels ``[B]``.

    Row layout: for cff, ``groups`` = V views concatenated view-major (row v*B + b); for the FF
    family, ``groups`` = 2: the B positives (true label) then the B negatives (wrong label)."""

    h: torch.Tensor
    labels: torch.Tensor
    groups: int

    def detached(self, h: torch.Tensor) -> "LayerBatch":
        return LayerBatch(h.detach(), self.labels, self.groups)


def pool_tokens(h: torch.Tensor, skip_tokens: int = 0) -> torch.Tensor:
    """Token mean for [B, T, D] (skipping non-image tokens), identity for [B, D]."""
    return h[:, skip_tokens:].mean(1) if h.dim() == 3 else h


class ContrastiveObjective:
    """CFF's per-layer loss: marginal SupCon on the pooled output, views as a list (ContrastiveFF layout)."""

    def __init__(self, margin: float, temperature: float = 0.15, backend: str = "auto"):
        self.margin, self.temperature, self.backend = margin, temperature, backend

    def __call__(self, out: torch.Tensor, batch: LayerBatch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        views = list(pool_tokens(out).chunk(batch.groups))
        loss, stats = marginal_supcon_loss(views, batch.labels, temperature=self.temperature, margin=self.margin,
                                           backend=self.backend, return_stats=True)
        return loss, stats.clipped_fraction

    def __repr__(self) -> str:
        return f"marginal_supcon(margin={self.margin:.3f}, temperature={self.temperature})"


class GoodnessObjective:
    """FF / SymBa / SFFA loss of the positive half against the negative half of the output."""

    def __init__(self, method: str, skip_tokens: int = 0, threshold: float = 2.0, alpha: float = 4.0, backend: str = "auto"):
        if method not in FF_FAMILY:
            raise ValueError(f"method must be one of {list(FF_FAMILY)} for a goodness objective, got {method!r}")
        self.method, self.skip_tokens, self.threshold, self.alpha, self.backend = method, skip_tokens, threshold, alpha, backend

    def __call__(self, out: torch.Tensor, batch: LayerBatch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        h_pos, h_neg = out.chunk(2)
        opts = dict(skip_tokens=self.skip_tokens, backend=self.backend)
        if self.method == "ff":
            return ff_loss(h_pos, h_neg, threshold=self.threshold, **opts), None
        if self.method == "symba":
            return symba_loss(h_pos, h_neg, alpha=self.alpha, **opts), None
        return sffa_loss(h_pos, h_neg, **opts), None

    def __repr__(self) -> str:
        return f"{self.method}_loss"


def layer_score(method: str, h: torch.Tensor, skip_tokens: int = 0, backend: str = "auto") -> torch.Tensor:
    """How "positive" a layer finds each sample ``[B]``: the goodness for ff/symba, and for sffa the
    log-odds log(E_P / E_N) of the energy of the positive vs the negative half of the units."""
    if method == "sffa":
        e = pool_tokens(h.float(), skip_tokens).pow(2)
        half = e.shape[-1] // 2
        return torch.log(e[:, :half].mean(-1) + 1e-8) - torch.log(e[:, half:].mean(-1) + 1e-8)
    return ff_goodness(h, skip_tokens=skip_tokens, backend=backend)


def wrong_labels(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from the true one, per sample (FF negatives)."""
    shift = torch.randint(1, num_classes, labels.shape, generator=gen, device=labels.device)
    return (labels + shift) % num_classes


def first_batch(method: str, encoder: Encoder, x: torch.Tensor, y: torch.Tensor, *, augment: Optional[Augment],
                num_views: int, seed: int, epoch: int, step: int, purpose: int = rng.AUGMENT) -> LayerBatch:
    """The first layer's input for batch ``step`` of ``epoch``. Its randomness (augmentations,
    negative labels) comes from the (seed, purpose, epoch, step) stream only, so any process can
    rebuild it, whatever the layers have done."""
    gen = rng.generator(seed, purpose, epoch, step, device=x.device)
    if method == "cff":
        views = make_views(x, num_views, augment, gen) if augment is not None else x.repeat(num_views, *([1] * (x.dim() - 1)))
        return LayerBatch(encoder.prepare(views), y, num_views)
    if method in FF_FAMILY:
        xa = augment(x, gen) if augment is not None else x
        inp = encoder.prepare(xa)
        neg = wrong_labels(y, encoder.num_classes, gen)
        return LayerBatch(torch.cat([encoder.embed_labels(inp, y), encoder.embed_labels(inp, neg)], 0), y, 2)
    raise ValueError(f"method {method!r} has no layer-local input; use one of ['cff', 'ff', 'symba', 'sffa']")


def make_objective(method: str, encoder: Encoder, margin: float, *, temperature: float = 0.15,
                   threshold: float = 2.0, alpha: float = 4.0, backend: str = "auto"):
    if method == "cff":
        return ContrastiveObjective(margin, temperature, backend)
    return GoodnessObjective(method, encoder.skip_tokens, threshold, alpha, backend)
