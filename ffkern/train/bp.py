"""The baseline everyone compares with: end-to-end backpropagation with cross-entropy through the
same encoder plus a linear head (the CFF paper's "BP+CE")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import rng
from .data import Augment, Dataset, batches
from .heads import linear_head
from .layerwise import StepStats
from .metrics import History
from .models import Encoder


def train_bp(encoder: Encoder, data: Dataset, history: History, *, epochs: int, batch_size: int, lr: float,
             weight_decay: float, augment: Augment, seed: int, epoch_bar=None, autocast_dtype=None):
    """Trains encoder + head jointly on one augmented view per batch; returns the head.
    Records the end-to-end CE loss as the history's single "layer"."""
    device = data.x_train.device
    head = linear_head(encoder.feature_dim, data.num_classes, seed).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    amp = dict(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for epoch in (epoch_bar if epoch_bar is not None else range(epochs)):
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
        if epoch_bar is not None and hasattr(epoch_bar, "set_postfix"):
            epoch_bar.set_postfix(loss=f"{history.last(0, 'train_loss'):.4f}")
    return head
