"""The layer pipeline on torch.distributed (CFF paper, section 5.1; SPEC 3): ``ffkern train --pipeline``.

Rank r of R owns a contiguous group of layers (``split_layers``): MLP layers, ViT blocks or conv
blocks. Rank 0 builds every batch's first-layer input from the seeded streams; every rank trains
its layers on the batch and hands the detached output and the labels to rank r+1 by
point-to-point messages. Communication overlaps compute: a stage posts the receive of message t+1
before it computes message t, and posts the send of t without waiting for it (at most
``MAX_SENDS_IN_FLIGHT`` sends outstanding, which bounds the memory of a fast stage that runs ahead
of a slow one).

Why the result equals the sequential run (bit for bit when every process uses the same number of
CPU threads): a layer's update depends only on its input batch (layerwise.py), the inputs come from
streams keyed by (seed, purpose, epoch, step) (rng.py), every process builds the same initial
weights and objectives (models.py, conv_models.py, methods.make_objective: seeded per layer), and
each stage sees its messages in the sequential order: the training batches of an epoch, then that
epoch's validation batches (evaluated with the weights at the end of the epoch, as the sequential
trainer does), then with the probe the epoch's Fisher pass (below). A message holds the activations with the sequential run's memory layout (strides),
so the next layer computes on the same tensor, channels-last maps included. The pipeline only
changes when work happens.

What a layer carries beyond its weights travels with it: BatchNorm's running statistics (buffers,
updated by the training steps, read by the validation and prediction passes), the learned FF label
map of the conv models (an nn.Embedding inside block 0, trained by block 0's optimizer), and an
objective's own parameters and buffers (sff's per-class 1x1 conv and learned scale). The encoder
selection (best validation epoch) keeps and restores all of them, as the sequential trainer's
EncoderSelector does.

After stage 1 the owners broadcast each layer's state (parameters and buffers of the layer and of
its objective), the per-layer histories are gathered on rank 0, and rank 0 evaluates (linear head,
FF's try-every-label over the chosen layers, or sff's per-class goodness, which reads the
objectives' weights) exactly as the sequential trainer does, runs the per-layer linear probe on
the selected encoder (probe.probe_encoder), and writes the metrics. The per-epoch Fisher criterion
of each layer's clean validation features (the probe's other half) is computed by the layer's
owner: after an epoch's validation batches the clean validation set goes through the pipeline
too ("fisher" messages, in probe.layer_fisher's slices), and each rank keeps its layers' pooled
features.

Message protocol between rank r and r+1: once, a header of ``_HEADER_LEN`` int64 (message count,
view groups, dtype, per-sample shape of the activations: [D] for the MLP, [T, D] for the ViT,
[C, H, W] for the conv models; and the per-sample strides); then per message the activations
[groups * B, ...] as their raw memory (one group for the Fisher pass) and the labels [B] (int64).
B of every message is known to both ranks in advance from the batch plan (``message_plan``), so
receives can be posted before the data exists.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from .._backend import resolve
from ..distributed import check_group
from .data import Dataset, batches, dataset_for
from .layerwise import run_layers
from .methods import LayerBatch
from .heads import layer_features
from .metrics import History
from .probe import fisher_criterion, probe_encoder
from .trainer import (EncoderSelector, TrainConfig, _progress, apply_device_options, build_augment, build_local_layers,
                      build_model, check_compatible, dataset_warnings, epoch_inputs, head_selection, layer_margins,
                      loss_postfix, per_class_backend, pick_device, predict_all, run_metrics, valid_batch_size,
                      valid_inputs, warn_nonfinite)

MAX_SENDS_IN_FLIGHT = 2  # messages a stage may have sent but not yet seen delivered
_MAGIC = 0x46464B50  # "FFKP": a header from this protocol, not stray bytes
_MAX_TAIL_DIMS = 4  # per-sample activation shape: [D] (MLP), [T, D] (ViT), [C, H, W] (conv models)
_HEADER_LEN = 5 + 2 * _MAX_TAIL_DIMS  # magic, messages, groups, dtype, ndim, tail dims, tail strides
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The slices of the per-epoch Fisher pass: layer_fisher's (heads.layer_features') batch size, whose
# slices the pipeline must cut alike (tests/test_pipeline.py checks that they agree).
FISHER_BATCH = 512
# Config fields that may differ between ranks: they change speed, never the numbers.
_LOCAL_FIELDS = ("threads",)


# ---------------------------------------------------------------- the plan (same on every rank)
def split_layers(depth: int, world: int) -> List[List[int]]:
    """Layer indices of each rank: contiguous groups, as even as possible (the first
    ``depth % world`` ranks get one more). Every rank needs at least one layer."""
    for name, v in (("depth", depth), ("world", world)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if world > depth:
        raise ValueError(f"the pipeline has {world} processes but the model has only {depth} layers; every rank needs at"
                         f" least one layer: use --layers >= {world} or --nproc_per_node <= {depth}")
    base, extra = divmod(depth, world)
    groups, start = [], 0
    for r in range(world):
        n = base + (r < extra)
        groups.append(list(range(start, start + n)))
        start += n
    return groups


def check_pipeline(cfg: TrainConfig, world: int) -> None:
    """The errors a pipeline run can know before any process talks to another (every rank raises
    the same one, so none is left waiting)."""
    if cfg.method == "bp":
        raise ValueError("method 'bp' (end-to-end backpropagation) cannot be pipelined layer by layer: every layer"
                         " needs the gradient from the loss at the end; use --method cff, ff, symba or sffa, or drop --pipeline")
    if cfg.olu:
        raise ValueError("olu=True (--olu): overlapping local updates train each block with its successor's loss, so a"
                         " block's update depends on the next block and the layers cannot run as a pipeline; drop --pipeline")
    split_layers(cfg.layers, world)


@dataclass(frozen=True)
class Message:
    """One batch through the pipeline: its split ("train" updates, "valid" only evaluates,
    "fisher" is a slice of the clean validation set whose pooled features give each layer's
    Fisher criterion), epoch, number of samples B, and whether it closes its epoch
    (history.end_epoch)."""

    split: str
    epoch: int
    samples: int
    last_of_epoch: bool


def message_plan(cfg: TrainConfig, num_train: int, num_valid: int) -> List[Message]:
    """Every message of stage 1 in order, as the sequential trainer runs them: per epoch the
    training batches (epoch_inputs), the validation batches (valid_inputs), and with the probe
    the clean validation set in slices of FISHER_BATCH (probe.layer_fisher's passes)."""
    plan = []
    fisher = [("fisher", min(FISHER_BATCH, num_valid - s)) for s in range(0, num_valid, FISHER_BATCH)] if cfg.probe else []
    for epoch in range(cfg.epochs):
        sizes = [("train", len(i)) for i in batches(num_train, cfg.batch_size, cfg.seed, epoch)]
        sizes += [("valid", len(i)) for i in batches(num_valid, valid_batch_size(cfg), cfg.seed, 0, shuffle=False)]
        sizes += fisher
        plan += [Message(split, epoch, n, k == len(sizes) - 1) for k, (split, n) in enumerate(sizes)]
    return plan


def world_size_from_env() -> int:
    """R before any process group exists: torchrun's WORLD_SIZE (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE must be an integer >= 1, got {text!r}") from None
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be an integer >= 1, got {text!r}")
    return world


# ---------------------------------------------------------------- point-to-point channels
def _dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether a tensor of these sizes and strides covers one block of memory, each element once
    (any order of the dimensions: contiguous, channels-last, ...)."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(shape, strides) if n != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _rows_strides(tail: Sequence[int], strides: Sequence[int]) -> tuple:
    """The strides of a message of ``tail``-shaped samples: the batch outermost, each sample laid
    out by ``strides`` (the first message's)."""
    return (math.prod(tail), *strides)


def _sendable(h: torch.Tensor) -> bool:
    """Whether ``h``'s memory is one block with the samples one after the other (sent as it is)."""
    return _dense(h.shape, h.stride()) and (h.shape[0] == 1 or h.stride(0) == math.prod(h.shape[1:]))


def _memory(h: torch.Tensor) -> torch.Tensor:
    """The block of memory of a dense tensor as a 1-D view (what goes over the wire)."""
    return h.as_strided((h.numel(),), (1,))


class Outbox:
    """Sends this stage's outputs to the next rank without waiting; the header goes first, with
    the shape, dtype, view groups and per-sample memory layout of the first message, which every
    later message keeps."""

    def __init__(self, dst: int, group, num_messages: int, device: torch.device):
        self.dst, self.group, self.num_messages, self.device = dst, group, num_messages, device
        self.groups: Optional[int] = None
        self.tail: Optional[tuple] = None
        self.strides: Optional[tuple] = None
        self.dtype: Optional[torch.dtype] = None
        self.pending: collections.deque = collections.deque()  # (works, tensors kept alive until sent)
        self.wait_s = 0.0

    def _header(self, h: torch.Tensor, groups: int) -> torch.Tensor:
        tail = tuple(h.shape[1:])
        if len(tail) > _MAX_TAIL_DIMS or h.dtype not in _DTYPES:
            raise RuntimeError(f"pipeline: cannot send activations of shape {list(h.shape)} and dtype {h.dtype}")
        self.groups, self.tail, self.dtype, self.strides = groups, tail, h.dtype, tuple(h.stride()[1:])
        pad = [0] * (_MAX_TAIL_DIMS - len(tail))
        values = [_MAGIC, self.num_messages, groups, _DTYPES.index(h.dtype), len(tail), *tail, *pad, *self.strides, *pad]
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _laid_out(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` itself when its memory can be sent as it is in the header's layout (the usual
        case: every batch of a stage comes out of the same operations), else a copy in it."""
        if self.strides is None:  # the first message sets the layout: the tensor's own where it is one block
            return h if _sendable(h) else h.contiguous()
        if tuple(h.shape[1:]) != self.tail or (tuple(h.stride()[1:]) == self.strides and _sendable(h)):
            return h  # (a wrong shape is reported by send)
        return torch.empty_strided(h.shape, _rows_strides(self.tail, self.strides), dtype=h.dtype,
                                   device=h.device).copy_(h)

    def send(self, batch: LayerBatch, msg: Message) -> None:
        h, y = self._laid_out(batch.h), batch.labels.to(torch.int64).contiguous()
        if self.tail is None:
            header = self._header(h, batch.groups)
            _wait(dist.batch_isend_irecv([dist.P2POp(dist.isend, header, self.dst, self.group)]))
        if tuple(h.shape[1:]) != self.tail or h.dtype != self.dtype or h.shape[0] != batch.groups * y.shape[0] \
                or batch.groups != _groups(msg, self.groups):
            # Every message of a stage has the shape announced in the header; anything else is a bug here.
            raise RuntimeError(f"pipeline: message of shape {list(h.shape)} {h.dtype} ({batch.groups} groups of"
                               f" {y.shape[0]} samples) does not match the header {self.tail} {self.dtype} ({self.groups} groups)")
        while len(self.pending) >= MAX_SENDS_IN_FLIGHT:
            self._wait_oldest()
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, _memory(h), self.dst, self.group),
                                        dist.P2POp(dist.isend, y, self.dst, self.group)])
        self.pending.append((works, (h, y)))

    def _wait_oldest(self) -> None:
        works, _ = self.pending.popleft()
        t = time.perf_counter()
        _wait(works)
        self.wait_s += time.perf_counter() - t

    def flush(self) -> None:
        while self.pending:
            self._wait_oldest()


class Inbox:
    """Receives the previous rank's outputs; ``post(i)`` starts the receive of message i into
    buffers sized from the plan and laid out as the header says, ``take(i)`` waits for it."""

    def __init__(self, src: int, group, plan: Sequence[Message], device: torch.device):
        self.src, self.group, self.plan, self.device = src, group, plan, device
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=device)
        t = time.perf_counter()
        _wait(dist.batch_isend_irecv([dist.P2POp(dist.irecv, header, src, group)]))
        self.wait_s = time.perf_counter() - t
        magic, count, groups, dtype, ndim, *rest = header.tolist()
        tail, strides = rest[:_MAX_TAIL_DIMS], rest[_MAX_TAIL_DIMS:]
        if magic != _MAGIC or not 0 <= dtype < len(_DTYPES) or not 0 <= ndim <= _MAX_TAIL_DIMS or groups < 1 \
                or not _dense(tail[:ndim], strides[:ndim]):
            raise RuntimeError(f"pipeline: rank {src} sent a header this version does not understand: {header.tolist()}")
        if count != len(plan):
            raise RuntimeError(f"pipeline: rank {src} plans {count} messages but this rank {len(plan)}; the ranks must run"
                               " the same command on the same data")
        self.groups, self.dtype, self.tail, self.strides = groups, _DTYPES[dtype], tuple(tail[:ndim]), tuple(strides[:ndim])
        self.posted: Dict[int, tuple] = {}

    def post(self, i: int) -> None:
        b, groups = self.plan[i].samples, _groups(self.plan[i], self.groups)
        h = torch.empty_strided((groups * b, *self.tail), _rows_strides(self.tail, self.strides), dtype=self.dtype,
                                device=self.device)
        y = torch.empty(b, dtype=torch.int64, device=self.device)
        works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, _memory(h), self.src, self.group),
                                        dist.P2POp(dist.irecv, y, self.src, self.group)])
        self.posted[i] = (works, h, y, groups)

    def take(self, i: int) -> LayerBatch:
        works, h, y, groups = self.posted.pop(i)
        t = time.perf_counter()
        _wait(works)
        self.wait_s += time.perf_counter() - t
        return LayerBatch(h, y, groups)


def _groups(msg: Message, stage_groups: int) -> int:
    """The row groups of a message: the stage's (views, or positives and negatives), but one for
    the Fisher pass (each clean sample once, with the neutral label)."""
    return 1 if msg.split == "fisher" else stage_groups


def _wait(works) -> None:
    for w in works or ():
        w.wait()


# ---------------------------------------------------------------- process group
def _rank_device(cfg: TrainConfig) -> torch.device:
    """CPU, or the GPU of this process on its node (torchrun's LOCAL_RANK)."""
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def _process_group(group, device: torch.device):
    """The group to run on: the one given, the default one if the caller made it, or a new one
    from torchrun's environment (one process without torchrun) that is destroyed afterwards."""
    if group is None and dist.is_initialized():
        group = dist.group.WORLD
    if group is not None:
        check_group(group, device)
        yield group
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, init_method="env://")
    else:  # a pipeline of one process: no launcher, no network
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=5))
    try:
        yield dist.group.WORLD
        # Ranks > 0 finish before rank 0 has evaluated; leaving together means no rank tears its
        # connections down while another still runs (gloo's I/O threads see a peer vanish).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_same_run(cfg: TrainConfig, data: Dataset, group) -> None:
    """Every rank must train the same thing: the configs and data shapes are all-gathered and
    compared; every rank sees the same table, so on a mismatch all raise the same error."""
    mine = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _LOCAL_FIELDS},
            "data": [data.name, len(data.y_train), len(data.y_valid), len(data.y_test), list(data.sample_shape), data.num_classes]}
    table: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(table, mine, group=group)
    for r, other in enumerate(table):
        if other != table[0]:
            keys = sorted(k for k in other["config"] if other["config"][k] != table[0]["config"].get(k))
            what = f"config fields {keys}" if keys else f"data {other['data']} vs {table[0]['data']}"
            raise ValueError(f"pipeline: rank {r} disagrees with rank 0 on {what}; every rank must run the same command")


# ---------------------------------------------------------------- the run
def train_pipeline(config: TrainConfig = TrainConfig(), *, progress: bool = True, log: Callable[[str], None] = print,
                   data: Optional[Dataset] = None, group=None) -> Optional[Dict]:
    """Runs ``config`` as a layer pipeline over the ranks of ``group`` (default: the initialized
    default group, else one from torchrun's environment, else a single process). Every rank calls
    this; rank 0 returns the metrics dict (the sequential run's, plus a "pipeline" entry), the
    others return None."""
    cfg = config.resolved()
    t0 = time.perf_counter()
    if group is None:  # with a group, _run checks against its size
        check_pipeline(cfg, world_size_from_env())
    device = _rank_device(cfg)
    apply_device_options(cfg, device, log)
    with _process_group(group, device) as pg:
        return _run(cfg, device, pg, data, progress, log, t0)


def _run(cfg: TrainConfig, device: torch.device, pg, data: Optional[Dataset], progress: bool,
         log: Callable[[str], None], t0: float) -> Optional[Dict]:
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    check_pipeline(cfg, world)
    owners = split_layers(cfg.layers, world)
    mine = owners[rank]
    backend_name = resolve(cfg.backend, device).name
    if cfg.method == "sff":  # the per-class loss: the backend that has its kernel, as the sequential trainer says
        backend_name = per_class_backend(cfg.backend, device)
    data = dataset_for(cfg, data)  # loaded unless given, with the protocol (label noise, fraction)
    _check_same_run(cfg, data, pg)
    check_compatible(cfg, data)  # after the comparison: every rank has the same data, so all raise alike
    if rank == 0:  # only the first stage reads inputs (and rank 0 evaluates at the end)
        data = data.to(device)
        log(f"ffkern train --pipeline: {cfg.method} on {cfg.model} | {data.summary()} | device {device}, loss backend"
            f" {backend_name} | {world} ranks ({dist.get_backend(pg)}), layers per rank {owners}")
        notes = dataset_warnings(data)
        for note in notes:
            log(f"warning: {note}")
    encoder = build_model(cfg, data).to(device)  # every rank: the same initial weights (seeded per layer)
    augment = build_augment(cfg, data)
    # Every rank builds every layer's objective (seeded per layer, as the encoder): sff's hold trained
    # weights that each owner broadcasts with its layers and rank 0 predicts with. Optimizers hold no
    # state before their first step, so the other ranks' layers cost only their objectives here.
    every = build_local_layers(cfg, encoder)
    layers = every[mine[0]:mine[-1] + 1]
    margins = layer_margins(cfg)
    history = History([f"layer {l}" for l in mine], [margins[l] for l in mine])
    plan = message_plan(cfg, len(data.y_train), len(data.y_valid))

    inbox = outbox = None
    if rank > 0:
        src = dist.get_global_rank(pg, rank - 1)
    if rank < world - 1:
        outbox = Outbox(dist.get_global_rank(pg, rank + 1), pg, len(plan), device)
    inputs = _first_stage_inputs(cfg, encoder, data, augment) if rank == 0 else None

    last = rank == world - 1
    bar = _progress(cfg.epochs, f"pipeline {cfg.method}/{cfg.model}", progress and last)  # the last stage ends last
    warned: set = set()
    selection = _Selection(cfg, layers, rank, world, pg, device)
    fisher = _FisherPass(cfg, encoder, layers, len(data.y_valid))
    dist.barrier(group=pg)  # start the clock together: stage1_s then measures the pipeline, not process starts
    t_stage = time.perf_counter()
    if rank > 0:
        inbox = Inbox(src, pg, plan, device)
        inbox.post(0)
    for i, msg in enumerate(plan):
        if rank == 0:
            batch = next(inputs)
            if batch.labels.shape[0] != msg.samples:
                raise RuntimeError(f"pipeline: batch {i} has {batch.labels.shape[0]} samples, the plan {msg.samples}")
        else:
            batch = inbox.take(i)
            if i + 1 < len(plan):
                inbox.post(i + 1)  # the next receive runs while this batch is computed
        if msg.split == "fisher":
            out = fisher.step(batch)
        else:
            out, stats = run_layers(layers, batch, train=msg.split == "train")
            for l, st in enumerate(stats):
                history.add(msg.split, l, st)
        if outbox is not None:
            outbox.send(out, msg)
        if msg.last_of_epoch:
            if fisher.active:
                history.add_fisher(fisher.criteria())
            history.end_epoch()
            warn_nonfinite(history, msg.epoch, warned, lambda s: log(f"rank {rank}: {s}"), first_layer=mine[0])
            selection.end_epoch(msg.epoch, history)
            if hasattr(bar, "update"):
                bar.set_postfix_str(loss_postfix(history, first_layer=mine[0]), refresh=False)
                bar.update(1)
    if outbox is not None:
        outbox.flush()
    selection.finish()  # every rank's layers now hold the selected epoch's weights
    stage1_s = time.perf_counter() - t_stage
    if hasattr(bar, "close"):
        bar.close()

    _share_weights([_trained_modules(layer) for layer in every], owners, pg)
    report = {"rank": rank, "layers": mine, "records": history.layers, "stage1_s": stage1_s,
              "wait_recv_s": inbox.wait_s if inbox else 0.0, "wait_send_s": outbox.wait_s if outbox else 0.0}
    reports = [None] * world if rank == 0 else None
    dist.gather_object(report, reports, dst=dist.get_global_rank(pg, 0), group=pg)
    if rank != 0:
        return None

    full = History([f"layer {l}" for l in range(cfg.layers)], margins)
    for rep in reports:
        for l, rec in zip(rep["layers"], rep["records"]):
            full.layers[l] = rec
    chosen = EncoderSelector(cfg.select_encoder, {})  # the same rule on the gathered history: the same epoch
    for epoch in range(cfg.epochs):
        chosen.update(epoch, _HistoryAt(full, epoch))
    autocast_dtype = torch.bfloat16 if cfg.bf16 else None
    result = predict_all(cfg, encoder, _Trained(every), data, autocast_dtype)
    result.pop("_head", None)
    if cfg.probe:  # of the selected encoder, as the sequential trainer (trainer.train) does it
        # no validation split: empty features of the right width (the probe keeps its last epoch)
        feats = None if len(data.y_valid) else {"valid": [f[:0] for f in layer_features(encoder, data.x_train[:1])]}
        full.set_probe(probe_encoder(encoder, data, seed=cfg.seed, autocast_dtype=autocast_dtype, features=feats))
    metrics = run_metrics(cfg, data, encoder, augment, full, result, backend_name, device, t0, log)
    metrics["warnings"] = notes
    metrics["selection"] = {"encoder": chosen.select(), "head": head_selection(result.get("head"))}
    metrics["pipeline"] = {
        "world_size": world, "layers_per_rank": owners, "process_group_backend": dist.get_backend(pg),
        "train_steps": sum(m.split == "train" for m in plan), "valid_steps": sum(m.split == "valid" for m in plan),
        "fisher_steps": sum(m.split == "fisher" for m in plan),
        "stage1_s": max(rep["stage1_s"] for rep in reports),
        "ranks": [{k: rep[k] for k in ("rank", "layers", "stage1_s", "wait_recv_s", "wait_send_s")} for rep in reports],
    }
    return metrics


class _HistoryAt:
    """The view of a history that EncoderSelector reads (the last layer's validation loss) at ``epoch``."""

    def __init__(self, history: History, epoch: int):
        self.names, self._history, self._epoch = history.names, history, epoch

    def last(self, layer: int, key: str):
        return self._history.layers[layer][key][self._epoch]


class _Selection:
    """The sequential run's encoder selection (trainer.EncoderSelector) across the ranks: only the
    last rank knows after each epoch whether the last layer's validation loss is the best so far;
    it sends that decision to every other rank without waiting. A rank keeps a copy of its layers'
    weights for each epoch whose decision has not arrived yet (the ranks ahead of it are at most a
    few messages ahead, so few copies), keeps the copy of the latest best epoch, and loads it at
    the end. ``select_encoder="last"`` sends and keeps nothing."""

    def __init__(self, cfg: TrainConfig, layers, rank: int, world: int, group, device):
        self.active = cfg.select_encoder == "best-valid"
        self.layers, self.rank, self.world, self.group = layers, rank, world, group
        self.last = rank == world - 1
        self.pending: Dict[int, List] = {}
        self.best = None
        self.sends: List = []
        self.local = EncoderSelector(cfg.select_encoder, {}) if self.last else None
        self.decisions = []
        if self.active and not self.last:  # one tiny receive per epoch, posted up front
            src = dist.get_global_rank(group, world - 1)
            for _ in range(cfg.epochs):
                t = torch.zeros(2, dtype=torch.int64, device=device)
                self.decisions.append((dist.irecv(t, src, group=group), t))
        self._device = device

    def _copy(self):  # each layer's state with its objective's (sff), as EncoderSelector keeps them
        return [[{k: v.detach().clone() for k, v in m.state_dict().items()} for m in _trained_modules(layer)]
                for layer in self.layers]

    def end_epoch(self, epoch: int, history: History) -> None:
        if not self.active:
            return
        if self.last:
            before = self.local.best_epoch
            self.local.update(epoch, history)
            better = self.local.best_epoch != before
            if better:
                self.best = self._copy()
            msg = torch.tensor([epoch, int(better)], dtype=torch.int64, device=self._device)
            for r in range(self.world - 1):
                self.sends.append((dist.isend(msg, dist.get_global_rank(self.group, r), group=self.group), msg))
            return
        self.pending[epoch] = self._copy()
        self._apply(wait=False)

    def _apply(self, wait: bool) -> None:
        while self.decisions and (wait or self.decisions[0][0].is_completed()):
            work, t = self.decisions.pop(0)
            work.wait()
            epoch, better = (int(v) for v in t.tolist())
            snapshot = self.pending.pop(epoch)
            if better:
                self.best = snapshot

    def finish(self) -> None:
        if not self.active:
            return
        self._apply(wait=True)
        for work, _ in self.sends:
            work.wait()
        if self.best is not None:
            for layer, states in zip(self.layers, self.best):
                for module, state in zip(_trained_modules(layer), states):
                    module.load_state_dict(state)


class _FisherPass:
    """The per-epoch Fisher criterion of this rank's layers (probe.layer_fisher of the sequential
    trainer, layer by layer): the clean validation set comes through the pipeline after each
    epoch's validation batches, in layer_fisher's slices; each layer runs in eval mode, without
    autocast unless --bf16, as heads.layer_features runs it, and keeps its pooled features; at the
    epoch's end the criterion of each layer's features."""

    def __init__(self, cfg: TrainConfig, encoder, layers, num_valid: int):
        self.active = cfg.probe and num_valid > 0  # as the sequential trainer: no validation split, no criterion
        self.encoder, self.layers = encoder, layers
        self.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
        self.features: List[List[torch.Tensor]] = [[] for _ in layers]
        self.labels: List[torch.Tensor] = []

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:  # as heads.layer_features: autocast off, whatever the caller set
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def step(self, batch: LayerBatch) -> LayerBatch:
        h = batch.h
        with self._autocast(h.device):
            for l, layer in enumerate(self.layers):
                layer.module.eval()
                h = layer.module(h)
                self.features[l].append(self.encoder.pool(h).float())
        self.labels.append(batch.labels)
        return LayerBatch(h, batch.labels, 1)

    def criteria(self) -> List[float]:
        y = torch.cat(self.labels)
        values = [fisher_criterion(torch.cat(parts), y) for parts in self.features]
        self.features, self.labels = [[] for _ in self.layers], []
        return values


def _fisher_inputs(encoder, data: Dataset) -> Iterator[LayerBatch]:
    """The first layer's input of the Fisher pass: the clean validation set (with the neutral
    label where the encoder takes one), sliced as heads.layer_features slices it."""
    for start in range(0, len(data.y_valid), FISHER_BATCH):
        h = encoder.prepare(data.x_valid[start:start + FISHER_BATCH])
        if encoder.label_input:
            h = encoder.embed_labels(h, None)
        yield LayerBatch(h, data.y_valid[start:start + FISHER_BATCH], 1)


def _first_stage_inputs(cfg: TrainConfig, encoder, data: Dataset, augment) -> Iterator[LayerBatch]:
    """Rank 0's stream: the sequential trainer's inputs in its order (message_plan's order)."""
    for epoch in range(cfg.epochs):
        yield from epoch_inputs(cfg, encoder, data, augment, epoch)
        yield from valid_inputs(cfg, encoder, data, augment)
        if cfg.probe:
            yield from _fisher_inputs(encoder, data)


def _trained_modules(layer) -> List[torch.nn.Module]:
    """What training changes of a layer: its module (parameters and buffers: BatchNorm's running
    statistics, block 0's label embedding) and its objective where that is a module (sff's
    per-class 1x1 conv and scale)."""
    return [layer.module] + ([layer.objective] if isinstance(layer.objective, torch.nn.Module) else [])


@dataclass
class _Trained:
    """What trainer.predict_all reads of a finished stage 1 (the sequential trainer's Stage1): every
    layer with its objective; no bp head (bp is never pipelined)."""

    layers: List
    bp_head: None = None


@torch.no_grad()
def _share_weights(modules: Sequence[Sequence[torch.nn.Module]], owners: Sequence[Sequence[int]], group) -> None:
    """Every layer's trained state from its owner to every rank, so that rank 0 holds the whole
    trained encoder and every objective: per layer, one broadcast per dtype of the flattened
    state-dict tensors (parameters and buffers, of the layer's modules: ``modules[l]``)."""
    for r, indices in enumerate(owners):
        src = dist.get_global_rank(group, r)
        for l in indices:
            by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
            for module in modules[l]:
                for t in module.state_dict().values():  # views of the parameters and buffers: copied into in place
                    by_dtype.setdefault(t.dtype, []).append(t)
            for tensors in by_dtype.values():  # one message per dtype: no value is ever cast
                flat = torch.cat([t.reshape(-1) for t in tensors])
                dist.broadcast(flat, src=src, group=group)
                start = 0
                for t in tensors:
                    t.copy_(flat[start:start + t.numel()].view_as(t))
                    start += t.numel()
