"""Public Forward-Forward goodness and goodness losses (SPEC 2)."""
from __future__ import annotations

import torch

from ._backend import resolve
from ._checks import GOODNESS_KINDS, check_activations, check_choice, check_number, check_pair, check_skip_tokens


def ff_goodness(h: torch.Tensor, *, kind: str = "mean", skip_tokens: int = 0, backend: str = "auto") -> torch.Tensor:
    """Goodness g(h) per sample, ``[B]``: mean (or "sum") over features of the squared activation;
    for tokens ``[B, T, D]`` of the token mean, skipping the first ``skip_tokens`` tokens."""
    check_activations("h", h, skip_tokens)
    check_choice("kind", kind, GOODNESS_KINDS)
    return resolve(backend, h.device).goodness(h, kind, int(skip_tokens))


def check_options(kind, skip_tokens) -> None:
    """The checks of the options shared by every goodness loss (also run by the modules at
    construction); the inputs' checks are in check_pair / check_activations."""
    check_choice("kind", kind, GOODNESS_KINDS)
    check_skip_tokens(skip_tokens)


def check_threshold(threshold) -> float:
    return check_number("threshold", threshold)


def check_alpha(alpha) -> float:
    return check_number("alpha", alpha, low=0.0, low_open=True)


def _pair(loss, h_pos, h_neg, param, kind, skip_tokens, backend, activity_term=False):
    check_pair(h_pos, h_neg, skip_tokens)
    check_choice("kind", kind, GOODNESS_KINDS)
    if loss == "sffa" and h_pos.shape[-1] % 2:
        raise ValueError(f"sffa_loss splits the D units into two halves: D must be even, got D={h_pos.shape[-1]}")
    return resolve(backend, h_pos.device).pair_loss(loss, h_pos, h_neg, param, kind, int(skip_tokens), activity_term)


def ff_loss(h_pos, h_neg, *, threshold: float = 2.0, kind: str = "mean", skip_tokens: int = 0, backend: str = "auto"):
    """Hinton's FF loss: mean over the 2B values of softplus(theta - g(h+)) and softplus(g(h-) - theta)."""
    threshold = check_threshold(threshold)
    return _pair("ff", h_pos, h_neg, threshold, kind, skip_tokens, backend)


def symba_loss(h_pos, h_neg, *, alpha: float = 4.0, kind: str = "mean", skip_tokens: int = 0, backend: str = "auto"):
    """SymBa loss: mean_b softplus(-alpha (g(h+_b) - g(h-_b)))."""
    alpha = check_alpha(alpha)
    return _pair("symba", h_pos, h_neg, alpha, kind, skip_tokens, backend)


def sffa_loss(h_pos, h_neg, *, kind: str = "mean", skip_tokens: int = 0, activity_term: bool = False,
              backend: str = "auto"):
    """SFFA loss: -mean of log q(h+) and log(1 - q(h-)), q the share of the first half's energy.

    ``activity_term=True``: times A = 1 + exp(-10 (mean(h+) + mean(h-))), as the SFFA authors'
    code does (SPEC 2); off by default (the plain loss of the paper's text)."""
    if not isinstance(activity_term, bool):
        raise TypeError(f"activity_term must be a bool, got {type(activity_term).__name__}")
    return _pair("sffa", h_pos, h_neg, None, kind, skip_tokens, backend, activity_term)
