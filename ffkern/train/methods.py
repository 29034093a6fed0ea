"""What each method feeds the first layer and what each layer's loss is (SPEC 3).

  cff    views of the batch (V = 2, or 1 in one-forward mode) -> marginal SupCon loss of the pooled
         output of every layer, with that layer's margin; stage 2: a linear head (methods' heads
         are in heads.py)
  ff     label embedded in the input; positives = true label, negatives = the same image with a
  symba  wrong label; each layer minimizes the goodness loss of its output (ffkern.ff_loss,
  sffa   symba_loss, sffa_loss); prediction tries every label (or a linear head)
  sff    Scalable FF (conv models): no label in the input; each block's per-class goodness loss
         (ffkern.per_class_goodness_loss: a 1x1 conv with one channel per class, softmax
         cross-entropy of the class goodness); prediction: argmax of the class goodness averaged
         over the blocks
  bp     end-to-end cross-entropy (trained in bp.py, not layer by layer)

Conv models' block outputs [B, C, H, W] reach the goodness losses as views (ffkern.feature_maps):
[B, C*H*W] for ff and symba (the Trifecta's goodness, the mean of squares over C, H, W), channel
tokens [B, H*W, C] for sffa (halves by channels); cff sees the globally average-pooled output.

A ``LayerBatch`` is everything a layer needs: rows of activations and the sample labels. It is
what one layer hands to the next, so a pipeline stage can receive it from another process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from torch import nn

from .. import ff_goodness, ff_loss, marginal_supcon_loss, sffa_loss, symba_loss
from ..feature_maps import channel_tokens, flat_features
from ..per_class import PerClassGoodnessLoss
from . import rng
from .data import Augment, make_views
from .models import Encoder

METHODS = ("cff", "ff", "symba", "sffa", "sff", "bp")
FF_FAMILY = ("ff", "symba", "sffa")
LAYER_LOCAL = ("cff", "ff", "symba", "sffa", "sff")


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
    """Token mean for [B, T, D] (skipping non-image tokens), global average pool for a feature map
    [B, C, H, W], identity for [B, D]."""
    if h.dim() == 4:
        return h.mean((2, 3))
    return h[:, skip_tokens:].mean(1) if h.dim() == 3 else h


def goodness_input(method: str, h: torch.Tensor) -> torch.Tensor:
    """What the goodness losses see of a layer output: a feature map as a view (flat for ff and
    symba, channel tokens for sffa; no copy), anything else as it is."""
    if h.dim() != 4:
        return h
    return channel_tokens(h) if method == "sffa" else flat_features(h)


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

    def __init__(self, method: str, skip_tokens: int = 0, threshold: float = 2.0, alpha: float = 4.0, backend: str = "auto",
                 sffa_activity: bool = False):
        if method not in FF_FAMILY:
            raise ValueError(f"method must be one of {list(FF_FAMILY)} for a goodness objective, got {method!r}")
        self.method, self.skip_tokens, self.threshold, self.alpha, self.backend = method, skip_tokens, threshold, alpha, backend
        self.sffa_activity = bool(sffa_activity)  # sffa: SFFA's activity factor (ffkern.sffa_loss activity_term)

    def __call__(self, out: torch.Tensor, batch: LayerBatch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        h_pos, h_neg = goodness_input(self.method, out).chunk(2)
        opts = dict(skip_tokens=self.skip_tokens, backend=self.backend)
        if self.method == "ff":
            return ff_loss(h_pos, h_neg, threshold=self.threshold, **opts), None
        if self.method == "symba":
            return symba_loss(h_pos, h_neg, alpha=self.alpha, **opts), None
        return sffa_loss(h_pos, h_neg, activity_term=self.sffa_activity, **opts), None

    def __repr__(self) -> str:
        return f"{self.method}_loss" + (" x activity" if self.method == "sffa" and self.sffa_activity else "")


# SFFA's activity factor 1 + exp(-10 (mean h+ + mean h-)) stays in (1, 2] for the non-negative
# outputs its authors use (ReLU): on by default for the models whose layers end in a ReLU. A ViT
# block's output (a residual stream) can have a negative mean, where the factor overflows.
SFFA_ACTIVITY_MODELS = ("mlp", "cnn", "resnet18")


def default_sffa_activity(method: str, model: str) -> bool:
    return method == "sffa" and model in SFFA_ACTIVITY_MODELS


def layer_score(method: str, h: torch.Tensor, skip_tokens: int = 0, backend: str = "auto") -> torch.Tensor:
    """How "positive" a layer finds each sample ``[B]``: the goodness for ff/symba, and for sffa the
    log-odds log(E_P / E_N) of the energy of the positive vs the negative half of the units."""
    h = goodness_input(method, h)
    if method == "sffa":
        e = pool_tokens(h.float(), skip_tokens).pow(2)
        half = e.shape[-1] // 2
        return torch.log(e[:, :half].mean(-1) + 1e-8) - torch.log(e[:, half:].mean(-1) + 1e-8)
    return ff_goodness(h, skip_tokens=skip_tokens, backend=backend)


class PerClassObjective(nn.Module):
    """Scalable FF's block loss (sff): ffkern.PerClassGoodnessLoss on the block output, with its
    own 1x1 conv (C -> K) and learned scale, trained by the block's optimizer (layerwise.py gives
    an objective's parameters to the layer's optimizer)."""

    def __init__(self, in_channels: int, num_classes: int, *, scale: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.criterion = PerClassGoodnessLoss(in_channels, num_classes, scale=scale, learnable_scale=True,
                                              backend=backend)

    def forward(self, out: torch.Tensor, batch: LayerBatch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.criterion(out, batch.labels), None

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """The scaled class goodness [B, K] of a block output (what prediction averages)."""
        return self.criterion.logits(out)


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
    if method == "sff":
        return LayerBatch(encoder.prepare(augment(x, gen) if augment is not None else x), y, 1)
    if method in FF_FAMILY:
        xa = augment(x, gen) if augment is not None else x
        inp = encoder.prepare(xa)
        neg = wrong_labels(y, encoder.num_classes, gen)
        return LayerBatch(torch.cat([encoder.embed_labels(inp, y), encoder.embed_labels(inp, neg)], 0), y, 2)
    raise ValueError(f"method {method!r} has no layer-local input; use one of {list(LAYER_LOCAL)}")


def make_objective(method: str, encoder: Encoder, margin: float, *, temperature: float = 0.15,
                   threshold: float = 2.0, alpha: float = 4.0, backend: str = "auto", layer: int = 0, seed: int = 0,
                   class_scale: float = 1.0, sffa_activity: bool = False):
    """The loss of layer ``layer``; for sff a module with parameters (its 1x1 conv, built under
    the layer's own seeded stream, on the encoder's device)."""
    if method == "sff":
        channels = getattr(encoder, "block_channels", None)
        if channels is None:
            raise ValueError(f"method 'sff' (the per-class conv loss) needs a conv model (cnn, resnet18, mobilenetv3),"
                             f" got model {encoder.kind!r}")
        device = next(encoder.parameters()).device
        with rng.seeded(seed, rng.INIT, 20_000 + layer):
            return PerClassObjective(channels[layer], encoder.num_classes, scale=class_scale, backend=backend).to(device)
    if method == "cff":
        return ContrastiveObjective(margin, temperature, backend)
    return GoodnessObjective(method, encoder.skip_tokens, threshold, alpha, backend, sffa_activity=sffa_activity)
