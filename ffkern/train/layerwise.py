"""Layer-local training: one layer, its own optimizer, its own loss (SPEC 3, the CFF paper's Algorithm 1).

``LocalLayer.train_step(batch)`` is the whole update rule: run the layer on the detached input,
compute its loss, step its optimizer, hand on the output computed *before* the step, detached.
No gradient ever leaves a layer, so a layer's update depends only on its input batch: layers can
run one after the other (``run_layers``) or as a pipeline of processes, each owning a contiguous
group of layers and receiving ``LayerBatch``es from the previous one, with the same result.

Losses are kept as tensors (no ``.item()`` per step, which would synchronize a GPU every layer);
``StepStats`` are turned into numbers once per epoch by metrics.History.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .methods import LayerBatch


@dataclass
class StepStats:
    """One layer on one batch: loss (0-dim tensor), clipped-positive fraction (0-dim, NaN when
    undefined; None for methods without one) and the number of samples B."""

    loss: torch.Tensor
    clipped_fraction: Optional[torch.Tensor]
    samples: int


class LocalLayer:
    """A layer with its own optimizer and objective.

    objective(out, batch) -> (loss, clipped_fraction or None). ``autocast_dtype`` (e.g.
    torch.bfloat16 on a GPU) runs the layer's forward under autocast; ``compile=True`` runs it
    through torch.compile (the loss stays outside: it is ffkern's own kernel)."""

    def __init__(self, index: int, module: nn.Module, objective: Callable, optimizer: torch.optim.Optimizer, *,
                 autocast_dtype: Optional[torch.dtype] = None, compile: bool = False):
        self.index, self.module, self.objective, self.optimizer = index, module, objective, optimizer
        self.autocast_dtype = autocast_dtype
        self._forward = torch.compile(module) if compile else module

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with self._autocast(h.device):
            return self._forward(h)

    def train_step(self, batch: LayerBatch) -> Tuple[LayerBatch, StepStats]:
        """One local update on ``batch``; returns the detached output (computed before the step)."""
        self.module.train()
        out = self.forward(batch.h.detach())  # detach: nothing flows back into earlier layers
        loss, clipped = self.objective(out, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return batch.detached(out), _stats(loss, clipped, batch)

    @torch.no_grad()
    def eval_step(self, batch: LayerBatch) -> Tuple[LayerBatch, StepStats]:
        """The layer's output and loss on ``batch`` without updating it (validation)."""
        self.module.eval()
        out = self.forward(batch.h)
        loss, clipped = self.objective(out, batch)
        return batch.detached(out), _stats(loss, clipped, batch)


def _stats(loss, clipped, batch: LayerBatch) -> StepStats:
    return StepStats(loss.detach(), None if clipped is None else clipped.detach(), int(batch.labels.shape[0]))


def train_layer_step(layer: LocalLayer, batch: LayerBatch) -> Tuple[LayerBatch, StepStats]:
    """Train ``layer`` on one batch of inputs and return its detached outputs (the reusable unit
    of layer-local training; a pipeline stage calls it for each of its layers)."""
    return layer.train_step(batch)


def run_layers(layers: Sequence[LocalLayer], batch: LayerBatch, train: bool = True) -> Tuple[LayerBatch, List[StepStats]]:
    """Passes ``batch`` through a contiguous group of layers, training each (or only evaluating)."""
    stats = []
    for layer in layers:
        batch, st = layer.train_step(batch) if train else layer.eval_step(batch)
        stats.append(st)
    return batch, stats


def make_local_layers(modules: Sequence[nn.Module], objectives: Sequence[Callable], *, lr: float,
                      weight_decay: float = 0.0, first_index: int = 0, autocast_dtype=None,
                      compile: bool = False) -> List[LocalLayer]:
    """One AdamW per layer (the paper's optimizer). ``first_index`` numbers a group of layers
    that does not start at layer 0 (a pipeline stage)."""
    if len(modules) != len(objectives):
        raise ValueError(f"got {len(modules)} layers but {len(objectives)} objectives")
    out = []
    for i, (module, objective) in enumerate(zip(modules, objectives)):
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        out.append(LocalLayer(first_index + i, module, objective, opt, autocast_dtype=autocast_dtype, compile=compile))
    return out
