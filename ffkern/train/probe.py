"""Per-layer diagnostics of a trained encoder: a linear probe's accuracy and the Fisher criterion.

The papers plot per-layer accuracy (a linear classifier on each layer's pooled features), and CFF
(Fig. 5) the Fisher criterion of each layer's pooled validation features next to the clipped
fraction. Both take the per-layer features ``heads.layer_features`` returns (the FF family's with
the neutral label, as its linear head sees them); SPEC 1.4 defines the criterion.

- ``fisher_criterion(features, labels)``: tr(S_B) / tr(S_W), float64, no N x N matrix.
- ``layer_fisher(encoder, x, y)``: the criterion of every layer on one split (e.g. the validation
  set once per epoch).
- ``probe_layers(...)`` / ``probe_encoder(...)``: a linear probe per layer (heads.train_linear_head,
  few epochs by default, deterministic in the seed) with its valid and test accuracy, and the
  Fisher criterion of the valid and test features, one dict per layer (``PROBE_KEYS``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from .heads import accuracy, layer_features, train_linear_head

PROBE_EPOCHS = 5  # enough for a linear probe on fixed features to settle on digits (see the README)
PROBE_KEYS = ("probe_valid_accuracy", "probe_test_accuracy", "probe_valid_fisher", "probe_test_fisher")


def _check_pair(features, labels, name: str = "features") -> None:
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                        f"{features.dtype if isinstance(features, torch.Tensor) else type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must be [N, D] (pooled features, one row per sample), got shape {list(features.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer torch.Tensor, got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be [N] = [{features.shape[0]}] for {name} of shape {list(features.shape)},"
                         f" got shape {list(labels.shape)}")


@torch.no_grad()
def fisher_criterion(features: torch.Tensor, labels: torch.Tensor, *, normalize: bool = True) -> float:
    """Fisher's multi-class criterion J = tr(S_B) / tr(S_W) of ``features`` [N, D] (SPEC 1.4).

    ``normalize``: each row is first scaled to unit L2 length (what the contrastive loss sees;
    the default), so that J measures directions, not lengths. Computed in float64 from the class
    means (memory O(N D), no N x N matrix). Returns NaN with fewer than two classes present or
    with no within-class spread and no between-class spread; +inf when only the within-class
    scatter is zero (the metrics JSON writes both as null)."""
    _check_pair(features, labels)
    f = features.detach().to(torch.float64)
    if normalize:
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if classes.numel() < 2:
        return float("nan")
    means = torch.zeros(classes.numel(), f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, inverse, f)
    means /= counts[:, None].to(torch.float64)
    between = (counts.to(torch.float64) * (means - f.mean(0)).pow(2).sum(1)).sum()
    within = (f - means[inverse]).pow(2).sum()  # two passes: no cancellation of sum ||f||^2 - sum n_c ||mu_c||^2
    b, w = float(between), float(within)
    if w == 0.0:
        return float("inf") if b > 0.0 else float("nan")
    return b / w


def layer_fisher(encoder, x: torch.Tensor, y: torch.Tensor, *, normalize: bool = True, batch_size: int = 512,
                 autocast_dtype=None) -> List[float]:
    """The Fisher criterion of every layer's pooled features of the clean inputs ``x`` (labels ``y``;
    the FF family with the neutral label). One forward pass over ``x``; leaves the encoder in eval
    mode (callers in a training loop set train mode per step anyway)."""
    feats = layer_features(encoder, x, batch_size=batch_size, autocast_dtype=autocast_dtype)
    return [fisher_criterion(f, y, normalize=normalize) for f in feats]


def probe_layers(train_feats: Sequence[torch.Tensor], train_y: torch.Tensor, valid_feats: Sequence[torch.Tensor],
                 valid_y: torch.Tensor, test_feats: Sequence[torch.Tensor], test_y: torch.Tensor, num_classes: int, *,
                 epochs: int = PROBE_EPOCHS, lr: float = 1e-2, batch_size: int = 256, seed: int = 0,
                 normalize: bool = True) -> List[Dict[str, float]]:
    """A linear probe (LayerNorm + Linear, heads.train_linear_head: the head of the best validation
    epoch) per layer on the frozen features, and the Fisher criterion of the valid and test
    features. Returns one dict per layer with the keys of PROBE_KEYS (accuracies NaN on an empty
    split). Deterministic in ``seed`` (every layer's probe uses the same seed)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs (of the linear probe) must be an int >= 1, got {epochs!r}")
    if not (len(train_feats) == len(valid_feats) == len(test_feats)) or not len(train_feats):
        raise ValueError(f"train_feats, valid_feats and test_feats must hold the same number (>= 1) of layers, got"
                         f" {len(train_feats)}, {len(valid_feats)}, {len(test_feats)}")
    out = []
    for l, (ftr, fva, fte) in enumerate(zip(train_feats, valid_feats, test_feats)):
        for name, f, y in (("train_feats", ftr, train_y), ("valid_feats", fva, valid_y), ("test_feats", fte, test_y)):
            _check_pair(f, y, f"{name}[{l}]")
        head, _ = train_linear_head(ftr, train_y, fva, valid_y, num_classes, epochs=epochs, lr=lr,
                                    batch_size=batch_size, seed=seed)
        with torch.no_grad():
            out.append({
                "probe_valid_accuracy": accuracy(head(fva), valid_y) if valid_y.numel() else math.nan,
                "probe_test_accuracy": accuracy(head(fte), test_y) if test_y.numel() else math.nan,
                "probe_valid_fisher": fisher_criterion(fva, valid_y, normalize=normalize) if valid_y.numel() else math.nan,
                "probe_test_fisher": fisher_criterion(fte, test_y, normalize=normalize) if test_y.numel() else math.nan,
            })
    return out


def probe_encoder(encoder, data, *, epochs: int = PROBE_EPOCHS, lr: float = 1e-2, batch_size: int = 256, seed: int = 0,
                  normalize: bool = True, autocast_dtype=None,
                  features: Optional[Dict[str, List[torch.Tensor]]] = None) -> List[Dict[str, float]]:
    """probe_layers on a trained encoder and a trainer Dataset (x/y_train, _valid, _test). Pass
    ``features`` ({"train": [...], "valid": [...], "test": [...]} from heads.layer_features) to
    reuse features already computed; otherwise one forward pass per split."""
    features = dict(features or {})
    for split in ("train", "valid", "test"):
        if split not in features:
            features[split] = layer_features(encoder, getattr(data, f"x_{split}"), autocast_dtype=autocast_dtype)
    return probe_layers(features["train"], data.y_train, features["valid"], data.y_valid, features["test"], data.y_test,
                        data.num_classes, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, normalize=normalize)
