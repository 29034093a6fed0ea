"""The baseline everyone compares with: end-to-end backpropagation with cross-entropy through the
same encoder plus a linear head (the CFF paper's "BP+CE")."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import rng
from .data import Augment, Dataset, batches
from .heads import linear_head
from .layerwise import StepStats
from .metrics import History
from .models import Encoder


def make_bp(encoder: Encoder, num_classes: int, *, lr: float, weight_decay: float, seed: int) -> Tuple[nn.Module, torch.optim.Optimizer]:
    """The head and the one AdamW over encoder + head (a checkpoint saves and restores both)."""
    device = next(encoder.parameters()).device
    head = linear_head(encoder.feature_dim, num_classes, seed).to(device)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=lr, weight_decay=weight_decay)
    return head, opt


def train_bp(encoder: Encoder, head: nn.Module, opt: torch.optim.Optimizer, data: Dataset, history: History, *,
             epochs: Iterable[int], batch_size: int, augment: Augment, seed: int, autocast_dtype=None,
             end_of_epoch: Optional[Callable[[int], None]] = None) -> None:
    """Trains encoder + head jointly on one augmented view per batch, over the epochs ``epochs``
    (a range, or a tqdm bar over one). Records the end-to-end CE loss as the history's single
    "layer"; ``end_of_epoch(epoch)`` runs after each epoch (selection, checkpoint)."""
    device = data.x_train.device
    amp = dict(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for epoch in epochs:
        encoder.train()
        head.train()
        for step, idx in enumerate(batches(len(data.y_train), batch_size, seed, epoch)):
            idx = idx.to(device)
            x = augment(data.x_train[idx], rng.generator(seed, rng.AUGMENT, epoch, step, device=device))
            with torch.autocast(**amp):
                loss = F.cross_entropy(head(encoder(x)).float(), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.add("train", 0, StepStats(loss.detach(), None, len(idx)))
        encoder.eval()
        head.eval()
        with torch.no_grad(), torch.autocast(**amp):
            for start in range(0, len(data.y_valid), 512):
                xv, yv = data.x_valid[start:start + 512], data.y_valid[start:start + 512]
                history.add("valid", 0, StepStats(F.cross_entropy(head(encoder(xv)).float(), yv), None, len(yv)))
        history.end_epoch()
        if end_of_epoch is not None:
            end_of_epoch(epoch)
        if hasattr(epochs, "set_postfix_str"):
            epochs.set_postfix_str(f"loss {history.last(0, 'train_loss'):.4f}")
