"""Public marginal supervised contrastive loss (CFF's "SupMCon", SPEC 1)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._backend import resolve
from ._checks import REDUCTIONS, Features, check_choice, check_number, flatten_features
from .reference import normalize_rows


class SupConStats(NamedTuple):
    """Diagnostics of one loss evaluation (SPEC 1.4), rows in view-major order."""

    clipped_fraction: torch.Tensor  # 0-dim: mean over anchors with positives of clipped / |P(i)| (NaN if none)
    num_positives: torch.Tensor  # [N] |P(i)|
    num_clipped: torch.Tensor  # [N] positives with s_ij + m >= 1


def clipped_fraction(num_positives: torch.Tensor, num_clipped: torch.Tensor) -> torch.Tensor:
    has = num_positives > 0
    frac = num_clipped[has].double() / num_positives[has].double()
    return frac.mean() if frac.numel() else torch.tensor(float("nan"), dtype=torch.float64)


def check_options(temperature, margin, reduction, normalize, base_temperature, return_stats):
    """The options' checks (also run by MarginalSupConLoss at construction); returns
    (temperature, margin, base_temperature) as floats."""
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    margin = check_number("margin", margin, low=0.0, high=2.0)
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if base_temperature is not None:
        base_temperature = check_number("base_temperature", base_temperature, low=0.0, low_open=True)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    return temperature, margin, base_temperature


def marginal_supcon_loss(
    features: Features,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 0.15,
    margin: float = 0.0,
    reduction: str = "mean",
    normalize: bool = True,
    base_temperature: Optional[float] = None,
    backend: str = "auto",
    group=None,
    return_stats: bool = False,
):
    """Marginal supervised contrastive loss of Contrastive Forward-Forward (SPEC 1.2).

    features: flat ``[N, D]`` (labels required), SupContrast ``[B, V, D]`` or a list of V ``[B, D]``
    views (ContrastiveFF). labels: integer ``[B]`` (``[N]`` for flat), or None for SimCLR positives
    (views of the same sample). The margin is added to positive similarities, clipped at 1.
    Returns the loss in float32 (float64 for float64 features): a scalar for "mean"/"sum", ``[N]``
    in view-major row order for "none"; with ``return_stats=True`` a pair ``(loss, SupConStats)``.
    Memory is O(N*D) for the triton and cpp backends; "reference" builds the N x N matrix.
    group: a torch.distributed ProcessGroup: this rank's anchors against the global batch of all
    ranks, reduced over the local anchors; backward gives the gradient of the sum over ranks of
    the losses (see ffkern.distributed; every rank must call it, and backward, together).
    """
    rows = flatten_features(features, labels)
    temperature, margin, base_temperature = check_options(temperature, margin, reduction, normalize,
                                                          base_temperature, return_stats)
    impl = resolve(backend, rows.x.device)

    x = rows.x
    if group is not None:
        from .distributed import global_supcon_rows

        per_anchor, num_pos, num_clipped = global_supcon_rows(
            normalize_rows(x, normalize), rows.labels, batch=rows.batch, simclr=labels is None,
            temperature=temperature, margin=margin, impl=impl, operand_dtype=x.dtype, group=group,
        )
    else:
        per_anchor, num_pos, num_clipped = impl.supcon_rows(x, rows.labels, temperature, margin, normalize)
    if base_temperature is not None:
        per_anchor = per_anchor * (temperature / base_temperature)
    if reduction == "mean":
        loss = per_anchor.sum() / per_anchor.shape[0]  # anchors without positives count as 0
    elif reduction == "sum":
        loss = per_anchor.sum()
    else:
        loss = per_anchor
    if return_stats:
        return loss, SupConStats(clipped_fraction(num_pos, num_clipped), num_pos, num_clipped)
    return loss
