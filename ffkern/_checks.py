"""Argument checks and input layouts (SPEC 1.1, 2).

Every public loss validates here, before any kernel runs, and raises ValueError/TypeError naming
the offending argument. The layouts of SPEC 1.1 are all flattened to view-major rows [N, D].
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
GOODNESS_KINDS = ("mean", "sum")

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


class Rows(NamedTuple):
    """Features flattened to view-major rows: row v*B + b is view v of sample b."""

    x: torch.Tensor  # [N, D], N = V * B
    labels: torch.Tensor  # [N] int64
    num_views: int
    batch: int


def check_number(name: str, value, *, low=None, high=None, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {list(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_float_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    return t


def flatten_features(features: Features, labels: Optional[torch.Tensor]) -> Rows:
    """Checks ``features``/``labels`` and returns view-major rows (SPEC 1.1)."""
    if isinstance(features, (list, tuple)):
        if len(features) == 0:
            raise ValueError("features: the list of views is empty")
        for v, f in enumerate(features):
            check_float_tensor(f"features[{v}]", f)
            if f.dim() != 2:
                raise ValueError(f"features[{v}] must be 2-D [B, D] (one view), got shape {tuple(f.shape)}")
            if f.shape != features[0].shape:
                raise ValueError(
                    f"features: all views must have the same shape, features[0] is {tuple(features[0].shape)}"
                    f" but features[{v}] is {tuple(f.shape)}"
                )
            if f.dtype != features[0].dtype:
                raise TypeError(f"features: views differ in dtype ({features[0].dtype} vs {f.dtype})")
            if f.device != features[0].device:
                raise ValueError(f"features: views are on different devices ({features[0].device} vs {f.device})")
        batch, dim = features[0].shape
        num_views = len(features)
        x = torch.cat(list(features), 0) if num_views > 1 else features[0]
        flat = False
    elif isinstance(features, torch.Tensor):
        check_float_tensor("features", features)
        if features.dim() == 3:
            batch, num_views, dim = features.shape
            x = features.transpose(0, 1).reshape(num_views * batch, dim)  # view-major
            flat = False
        elif features.dim() == 2:
            num_views = 1
            batch, dim = features.shape
            x = features
            flat = True
        else:
            raise ValueError(
                "features must be [N, D] (flat), [B, V, D] (SupContrast) or a list of V [B, D] views;"
                f" got a {features.dim()}-D tensor of shape {tuple(features.shape)}"
            )
    else:
        raise TypeError(f"features must be a torch.Tensor or a list of tensors, got {type(features).__name__}")

    if batch == 0 or num_views == 0:
        raise ValueError("features: empty batch (no samples)")
    if dim == 0:
        raise ValueError("features: feature dimension D is 0")

    n = batch * num_views
    if labels is None:
        if flat:
            raise ValueError(
                "labels is required for flat [N, D] features; use [B, V, D] or a list of views for SimCLR (labels=None)"
            )
        if num_views < 2:
            raise ValueError("labels=None (SimCLR positives) needs at least 2 views")
        # SimCLR: rows are positives exactly when they are views of the same sample.
        row_labels = torch.arange(batch, device=x.device).repeat(num_views)
    else:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor of integers, got {type(labels).__name__}")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
        if labels.shape[0] != batch:
            raise ValueError(f"labels has length {labels.shape[0]}, expected {batch} (one per sample)")
        if labels.device != x.device:
            raise ValueError(f"labels is on {labels.device} but features is on {x.device}")
        row_labels = labels.to(torch.int64).repeat(num_views) if num_views > 1 else labels.to(torch.int64)
    assert row_labels.shape[0] == n
    return Rows(x, row_labels.contiguous(), num_views, batch)


def check_skip_tokens(skip_tokens) -> int:
    if isinstance(skip_tokens, bool) or not isinstance(skip_tokens, numbers.Integral):
        raise TypeError(f"skip_tokens must be an int, got {type(skip_tokens).__name__}")
    if skip_tokens < 0:
        raise ValueError(f"skip_tokens must be >= 0, got {skip_tokens}")
    return int(skip_tokens)


def check_activations(name: str, h, skip_tokens) -> torch.Tensor:
    check_float_tensor(name, h)
    if h.dim() not in (2, 3):
        raise ValueError(f"{name} must be [B, D] or [B, T, D], got shape {tuple(h.shape)}")
    if h.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (B = 0)")
    if h.shape[-1] == 0:
        raise ValueError(f"{name}: feature dimension D is 0")
    check_skip_tokens(skip_tokens)
    if h.dim() == 2 and skip_tokens != 0:
        raise ValueError(f"skip_tokens={skip_tokens} needs token activations [B, T, D], {name} is [B, D]")
    if h.dim() == 3 and skip_tokens >= h.shape[1]:
        raise ValueError(f"skip_tokens={skip_tokens} leaves no tokens of the {h.shape[1]} in {name}")
    return h


def check_pair(h_pos, h_neg, skip_tokens) -> None:
    check_activations("h_pos", h_pos, skip_tokens)
    check_activations("h_neg", h_neg, skip_tokens)
    if h_pos.shape != h_neg.shape:
        raise ValueError(f"h_pos and h_neg must have the same shape, got {tuple(h_pos.shape)} and {tuple(h_neg.shape)}")
    if h_pos.dtype != h_neg.dtype:
        raise TypeError(f"h_pos and h_neg must have the same dtype, got {h_pos.dtype} and {h_neg.dtype}")
    if h_pos.device != h_neg.device:
        raise ValueError(f"h_pos is on {h_pos.device} but h_neg is on {h_neg.device}")
