"""Prediction: frozen-encoder features, the stage-2 linear head, and FF's try-every-label rule."""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import rng
from .data import batches
from .methods import layer_score
from .models import Encoder


@torch.no_grad()
def layer_features(encoder: Encoder, x: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                   batch_size: int = 512, autocast_dtype=None) -> List[torch.Tensor]:
    """Pooled output of every layer, ``[N, D]`` each, float32, for clean inputs ``x``. For an
    encoder with label input, ``labels`` is embedded (None: the neutral, all-zero label)."""
    encoder.eval()
    per_layer: List[List[torch.Tensor]] = [[] for _ in encoder.layers]
    for start in range(0, x.shape[0], batch_size):
        h = encoder.prepare(x[start:start + batch_size])
        if encoder.label_input:
            lab = None if labels is None else labels[start:start + batch_size]
            h = encoder.embed_labels(h, lab)
        with _autocast(x.device, autocast_dtype):
            for l, layer in enumerate(encoder.layers):
                h = layer(h)
                per_layer[l].append(encoder.pool(h).float())
    return [torch.cat(parts, 0) for parts in per_layer]


def _autocast(device, dtype):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def linear_head(dim: int, num_classes: int, seed: int) -> nn.Module:
    """LayerNorm + Linear (as the CFF code's head): the norm makes the head indifferent to the
    scale of the features, which a contrastive loss leaves free."""
    with rng.seeded(seed, rng.INIT, 10_000):
        return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean().item()) if labels.numel() else float("nan")


def train_linear_head(train_f: torch.Tensor, train_y: torch.Tensor, valid_f: torch.Tensor, valid_y: torch.Tensor,
                      num_classes: int, *, epochs: int, lr: float, batch_size: int, seed: int) -> Tuple[nn.Module, Dict]:
    """Cross-entropy training of a linear head on fixed features (stage 2). Keeps the head of the
    epoch with the lowest validation cross-entropy, as the CFF code does (the first such epoch on
    ties; the last epoch when there is no validation split). ``info`` records both curves."""
    head = linear_head(train_f.shape[1], num_classes, seed).to(train_f.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    info = {"train_loss": [], "valid_accuracy": [], "valid_loss": [], "best_epoch": 0,
            "selected_by": "validation cross-entropy" if valid_y.numel() else "last epoch (no validation split)"}
    best, best_loss = copy.deepcopy(head.state_dict()), math.inf
    for epoch in range(epochs):
        head.train()
        total, n = torch.zeros((), device=train_f.device), 0
        for idx in batches(train_f.shape[0], batch_size, seed + 7919, epoch):
            idx = idx.to(train_f.device)
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
            n += len(idx)
        head.eval()
        with torch.no_grad():
            logits = head(valid_f) if valid_y.numel() else None
            acc = accuracy(logits, valid_y) if logits is not None else float("nan")
            valid_loss = float(F.cross_entropy(logits, valid_y).item()) if logits is not None else float("nan")
        info["train_loss"].append(float(total.item()) / n)
        info["valid_accuracy"].append(acc)
        info["valid_loss"].append(valid_loss)
        if not valid_y.numel() or valid_loss < best_loss:  # NaN never wins: an earlier finite epoch stays
            best, best_loss, info["best_epoch"] = copy.deepcopy(head.state_dict()), valid_loss, epoch
    head.load_state_dict(best)
    head.eval()
    return head, info


@torch.no_grad()
def goodness_logits(encoder: Encoder, method: str, x: torch.Tensor, *, batch_size: int = 512,
                    skip_first: bool = False, backend: str = "auto", autocast_dtype=None,
                    layers: Optional[Sequence[int]] = None) -> torch.Tensor:
    """FF prediction by trying every label: ``[N, C]``, entry (n, c) = the sum over the chosen
    layers (``layers``, indices; default all) of the layer's score (goodness, or SFFA's log-odds)
    with label c embedded. C forward passes, each only as deep as the deepest chosen layer.
    ``skip_first`` leaves out the first layer's score, as Hinton's FF evaluation does."""
    encoder.eval()
    chosen = set(range(len(encoder.layers)) if layers is None else layers)
    if skip_first and len(encoder.layers) > 1:
        chosen.discard(0)
    depth = max(chosen) + 1
    out = torch.zeros(x.shape[0], encoder.num_classes, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        inp = encoder.prepare(x[start:start + batch_size])
        b = inp.shape[0]
        for c in range(encoder.num_classes):
            h = encoder.embed_labels(inp, torch.full((b,), c, dtype=torch.long, device=x.device))
            with _autocast(x.device, autocast_dtype):
                for l, layer in enumerate(encoder.layers[:depth]):
                    h = layer(h)
                    if l in chosen:
                        out[start:start + b, c] += layer_score(method, h, encoder.skip_tokens, backend).float()
    return out


@torch.no_grad()
def class_goodness_logits(encoder: Encoder, objectives, x: torch.Tensor, *, batch_size: int = 512,
                          autocast_dtype=None, layers: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Scalable-FF prediction (method sff): ``[N, K]``, the mean over the chosen blocks (``layers``,
    default all) of each block's scaled class goodness (``objectives[l].logits``, the per-class 1x1
    conv of block l). One forward pass per sample, no label in the input."""
    encoder.eval()
    chosen = set(range(len(encoder.layers)) if layers is None else layers)
    depth = max(chosen) + 1
    out = torch.zeros(x.shape[0], encoder.num_classes, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        h = encoder.prepare(x[start:start + batch_size])
        with _autocast(x.device, autocast_dtype):
            for l, (layer, objective) in enumerate(zip(encoder.layers[:depth], objectives)):
                h = layer(h)
                if l in chosen:
                    out[start:start + h.shape[0]] += objective.logits(h).float()
    return out / len(chosen)
