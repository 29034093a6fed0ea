"""Saved runs: ``ffkern train --save DIR``, ``--resume DIR`` and ``ffkern eval DIR``.

A run folder holds

  checkpoint.pt   everything, in one file: the encoder (the last epoch's weights, which a resumed
                  run continues from, and the selected epoch's, which prediction uses), the
                  objectives' parameters (sff's per-class 1x1 convs), every layer's optimizer
                  state, the stage-2 head, and a JSON text with the resolved config, the epochs
                  done, the training history, the selection and the data's fingerprint
  config.json     the resolved config (to read; checkpoint.pt is what is loaded)
  metrics.json    the metrics of the finished run

Only plain state dicts, tensors, numbers and strings are saved (torch.save), and they are read
back with ``torch.load(weights_only=True)``, which refuses anything else: loading a folder never
runs code from it. Every file is written atomically (a temporary file, then os.replace), after
every epoch, so an interrupted run leaves the last finished epoch's checkpoint, never half a file.
Resuming is exact because nothing else is random: every draw comes from the (seed, epoch, step)
streams of rng.py.
"""
from __future__ import annotations

import io
import json
import os
import warnings
import zlib
from typing import Dict, Optional

import torch

from .._atomic import atomic_write

FORMAT = "ffkern-train-run"
VERSION = 1
CHECKPOINT, CONFIG, METRICS = "checkpoint.pt", "config.json", "metrics.json"


class CheckpointError(ValueError):
    """A run folder that is missing, foreign, damaged or of another format version (the message
    names the folder)."""


def checkpoint_path(folder: str) -> str:
    return os.path.join(os.fspath(folder), CHECKPOINT)


def holds_run(folder: str) -> bool:
    """Whether ``folder`` already holds a saved run (so that a new run does not overwrite it)."""
    return os.path.isfile(checkpoint_path(folder))


def data_fingerprint(data) -> Dict:
    """What identifies a dataset for resuming and evaluating: sizes, sample shape, classes and a
    checksum of the training labels (the split, the label noise and the fraction show in them)."""
    labels = data.y_train.detach().cpu().to(torch.int64).numpy().tobytes()
    return {"name": data.name, "num_train": len(data.y_train), "num_valid": len(data.y_valid),
            "num_test": len(data.y_test), "sample_shape": list(data.sample_shape), "num_classes": int(data.num_classes),
            "train_labels_crc32": zlib.crc32(labels)}


def _plain(obj):
    """JSON of a metadata value: tuples become lists (the config's randaug pair)."""
    return json.loads(json.dumps(obj, allow_nan=True))


def save(folder: str, meta: Dict, tensors: Dict) -> None:
    """Writes checkpoint.pt (``tensors``: state dicts, lists of them, None; ``meta``: JSON-able)
    and config.json, each atomically; ``meta["metrics"]``, when present, also as metrics.json."""
    folder = os.fspath(folder)
    state = {"format": FORMAT, "version": VERSION, "meta": json.dumps(_plain(meta), allow_nan=True), **tensors}
    buffer = io.BytesIO()
    torch.save(state, buffer)  # into memory first: a failure to pickle leaves no file at all
    atomic_write(checkpoint_path(folder), lambda f: f.write(buffer.getvalue()), binary=True)
    atomic_write(os.path.join(folder, CONFIG), lambda f: f.write(json.dumps(_plain(meta["config"]), indent=2) + "\n"))
    if meta.get("metrics") is not None:
        from .metrics import write_metrics

        write_metrics(os.path.join(folder, METRICS), meta["metrics"])


def load(folder: str, map_location=None) -> Dict:
    """The saved run of ``folder``: its tensors with ``"meta"`` parsed. CheckpointError (naming the
    folder) for a missing folder, a folder without a run, a damaged file or a foreign one."""
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise CheckpointError(f"{folder}: no such folder (a run is saved with ffkern train --save {folder})")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder: give the folder that ffkern train --save wrote")
    path = checkpoint_path(folder)
    if not os.path.isfile(path):
        held = sorted(os.listdir(folder))[:8]
        raise CheckpointError(f"{folder} holds no saved ffkern run (no {CHECKPOINT}; it holds: "
                              f"{', '.join(held) if held else 'nothing'}); a run is saved with ffkern train --save DIR")
    try:
        with warnings.catch_warnings():  # torch's note on a foreign pickle protocol: the error below says it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read it means "not a checkpoint we can use"; said
        first = (str(exc).strip().splitlines() or [""])[0]  # torch's weights_only errors run over many lines
        raise CheckpointError(f"{path} cannot be read as an ffkern checkpoint (damaged, truncated, or not saved by"
                              f" ffkern: only plain tensors and state dicts are loaded): {type(exc).__name__}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("meta"), str):
        raise CheckpointError(f"{path} is not an ffkern training checkpoint (no {FORMAT!r} marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state.get('version')!r}; this ffkern reads"
                              f" version {VERSION}")
    try:
        state["meta"] = json.loads(state["meta"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: its metadata is damaged ({exc})") from None
    return state


def state_dict_copy(module) -> Dict[str, torch.Tensor]:
    """A detached copy of a module's state (the selected epoch's weights, kept in memory)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def maybe(obj, fn) -> Optional[Dict]:
    return None if obj is None else fn(obj)


def saved_config(meta: Dict):
    """The TrainConfig a run was saved with (its resolved values)."""
    from .trainer import TrainConfig

    config = dict(meta["config"])
    if config.get("randaug") is not None:
        config["randaug"] = tuple(config["randaug"])
    return TrainConfig(**config)


def evaluate(folder: str, *, dataset: Optional[str] = None, data_dir: Optional[str] = None, topk: Optional[int] = None,
             device: str = "auto", log=print) -> Dict:
    """``ffkern eval``: the saved, finished run of ``folder`` (its selected encoder and its head)
    on a dataset's test split (and validation split), without training. ``dataset`` (default: the
    run's own) must have the run's sample shape and classes. Returns the accuracies."""
    import dataclasses

    from .data import load_dataset
    from .heads import linear_head
    from .trainer import accuracies, build_local_layers, build_model, pick_device, prediction_logits

    dev = pick_device(device)
    state = load(folder, map_location=dev)
    meta = state["meta"]
    if not meta.get("finished"):
        raise CheckpointError(f"{folder}: the saved run stopped after epoch {meta['epochs_done']} of"
                              f" {meta['config']['epochs']}, before its prediction was set up; finish it first:"
                              f" ffkern train --resume {folder}")
    cfg = saved_config(meta)
    if dataset is None:  # the run's own data; --data-dir alone: its files found in another folder
        dataset, data_dir = cfg.dataset, data_dir if data_dir is not None else cfg.data_dir
    cfg = dataclasses.replace(cfg, dataset=dataset, data_dir=data_dir, topk=topk, device=str(dev.type)).resolved()
    data = load_dataset(cfg.dataset, cfg.seed, cfg.valid_fraction, data_dir=cfg.data_dir).to(dev)
    trained = meta["data"]
    if list(data.sample_shape) != trained["sample_shape"] or data.num_classes != trained["num_classes"]:
        raise ValueError(f"dataset {data.name} has samples of shape {list(data.sample_shape)} and {data.num_classes}"
                         f" classes, but the run in {folder} was trained on {trained['name']}: shape"
                         f" {trained['sample_shape']}, {trained['num_classes']} classes")
    if topk is not None and topk > data.num_classes:
        raise ValueError(f"topk (--topk) {topk} is more than the {data.num_classes} classes of dataset {data.name}")
    encoder = build_model(cfg, data)
    for name, value in meta.get("encoder_attrs", {}).items():
        setattr(encoder, name, value)
    selected = state["best"] if state.get("best") is not None else state["modules"]
    encoder.load_state_dict(selected["encoder"])
    head = objectives = None
    if cfg.method == "bp":
        head = linear_head(encoder.feature_dim, data.num_classes, cfg.seed).to(dev)
        head.load_state_dict(selected["bp_head"])
    elif meta.get("head_dim") is not None:
        head = linear_head(meta["head_dim"], data.num_classes, cfg.seed).to(dev)
        head.load_state_dict(state["head"])
        head.eval()
    if cfg.method == "sff":
        objectives = [layer.objective for layer in build_local_layers(cfg, encoder)]
        for l, objective in enumerate(objectives):
            objective.load_state_dict(selected[f"objective{l}"])
    autocast = torch.bfloat16 if cfg.bf16 else None
    result = accuracies(cfg, lambda x: prediction_logits(cfg, encoder, x, head=head, objectives=objectives,
                                                         autocast_dtype=autocast), data)
    saved_metrics = meta.get("metrics") or {}
    log(f"ffkern eval {folder}: {cfg.method} on {cfg.model} trained on {trained['name']} | {data.summary()}")
    log(f"test accuracy {100 * result['test_accuracy']:.2f}% (valid {100 * result['valid_accuracy']:.2f}%)"
        + "".join(f", top-{topk} {100 * result[f'test_top{topk}_accuracy']:.2f}%" for _ in [0] if topk))
    return {**result, "run": os.fspath(folder), "method": cfg.method, "model": cfg.model, "dataset": data.name,
            "num_valid": len(data.y_valid), "num_test": len(data.y_test), "trained_on": trained["name"],
            "saved_test_accuracy": saved_metrics.get("test_accuracy"), "device": str(dev)}
