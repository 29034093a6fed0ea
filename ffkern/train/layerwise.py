"""Layer-local training: one layer, its own optimizer, its own loss (SPEC 3, the CFF paper's Algorithm 1).

``LocalLayer.train_step(batch)`` is the whole update rule: run the layer on the detached input,
compute its loss, step its optimizer, hand on the output computed *before* the step, detached.
No gradient ever leaves a layer, so a layer's update depends only on its input batch: layers can
run one after the other (``run_layers``) or as a pipeline of processes, each owning a contiguous
group of layers and receiving ``LayerBatch``es from the previous one, with the same result.

A layer is any nn.Module: one Linear + ReLU (MLP), a transformer block (ViT) or a whole conv
block (cnn, resnet18, mobilenetv3: backprop inside the block, none across blocks). An objective
may itself have parameters (sff's per-class 1x1 conv): they join the layer's optimizer.

Overlapping local updates (``olu_train_step``, the Trifecta's OLU) are the one exception to "no
gradient leaves a layer": the loss of a block also trains its predecessor (never more than two
blocks), so the layers cannot be pipelined then.

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


def olu_is_loss_block(index: int, step: int) -> bool:
    """OLU (the Trifecta): on even steps the odd blocks compute a loss, which trains the pairs
    (0,1), (2,3), ...; on odd steps the even blocks, pairs (embedding,0), (1,2), ... (block 0's
    loss trains block 0 with the label embedding, which is part of block 0 here). The step is the
    batch index within the epoch, as in the authors' code (Lightning's batch_idx)."""
    return (index % 2 == 0) != (step % 2 == 0)


def olu_train_step(layers: Sequence[LocalLayer], batch: LayerBatch, step: int) -> Tuple[LayerBatch, List[Optional[StepStats]]]:
    """One step of overlapping local updates over all layers (``make_local_layers(..., olu=True)``
    gives each layer l > 0 one optimizer over blocks l-1 and l, as the Trifecta's code does).

    A block that is the first of its pair passes its output on with its graph; the second block
    computes its loss on it, so its optimizer updates both blocks, and passes its output (computed
    before the step) on detached. A last block without a partner is not updated on that step (its
    stats are None, as for every first block of a pair)."""
    stats: List[Optional[StepStats]] = [None] * len(layers)
    h = batch.h.detach()
    for i, layer in enumerate(layers):
        layer.module.train()
        out = layer.forward(h)
        if olu_is_loss_block(layer.index, step):
            loss, clipped = layer.objective(out, batch)
            layer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            layer.optimizer.step()
            stats[i] = _stats(loss, clipped, batch)
            h = out.detach()
        else:
            h = out  # its graph goes on: the next block's loss trains this one too
    return batch.detached(h), stats


def _parameters(module: nn.Module, objective) -> List[torch.nn.Parameter]:
    extra = list(objective.parameters()) if isinstance(objective, nn.Module) else []
    return list(module.parameters()) + extra


def make_local_layers(modules: Sequence[nn.Module], objectives: Sequence[Callable], *, lr: float,
                      weight_decay: float = 0.0, first_index: int = 0, autocast_dtype=None,
                      compile: bool = False, olu: bool = False) -> List[LocalLayer]:
    """One AdamW per layer (the paper's optimizer) over the layer's parameters and its objective's.
    ``first_index`` numbers a group of layers that does not start at layer 0 (a pipeline stage).
    ``olu``: layer l > 0's optimizer also holds layer l-1's parameters (the Trifecta's OLU; block
    l-1 then has two optimizers with their own moments, as in the authors' code)."""
    if len(modules) != len(objectives):
        raise ValueError(f"got {len(modules)} layers but {len(objectives)} objectives")
    if olu and first_index != 0:
        raise ValueError("overlapping local updates need every layer in one group (first_index 0)")
    out = []
    for i, (module, objective) in enumerate(zip(modules, objectives)):
        params = (list(modules[i - 1].parameters()) if olu and i > 0 else []) + _parameters(module, objective)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        out.append(LocalLayer(first_index + i, module, objective, opt, autocast_dtype=autocast_dtype, compile=compile))
    return out
