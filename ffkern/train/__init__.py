"""ffkern.train: layer-local training (CFF, FF, SymBa, SFFA) and the BP baseline on ffkern's losses.

The pieces, one job each: schedules (per-layer margins), data (digits / .npz, splits, two-view
augmentations), models (MLP and ViT as lists of layers), methods (each method's first-layer
input and per-layer loss), layerwise (the local update rule: ``train_layer_step``), heads
(stage-2 head, FF prediction), bp (end-to-end baseline), metrics (history, JSON, table, plot),
trainer (the run), cli (``ffkern train``).
"""
from .data import Augment, Dataset, DatasetError, load_dataset, load_digits, load_npz, make_views, remap_labels
from .layerwise import LocalLayer, StepStats, make_local_layers, run_layers, train_layer_step
from .methods import FF_FAMILY, METHODS, ContrastiveObjective, GoodnessObjective, LayerBatch, first_batch, make_objective
from .models import MLPEncoder, ViTEncoder, build_encoder
from .schedules import SCHEDULES, margin_schedule
from .trainer import TrainConfig, build_local_layers, build_model, epoch_inputs, train, valid_inputs

__all__ = [
    "Augment", "ContrastiveObjective", "Dataset", "DatasetError", "FF_FAMILY", "GoodnessObjective", "LayerBatch", "LocalLayer",
    "METHODS", "MLPEncoder", "SCHEDULES", "StepStats", "TrainConfig", "ViTEncoder", "build_encoder", "first_batch",
    "load_dataset", "load_digits", "load_npz", "make_local_layers", "make_objective", "make_views", "margin_schedule",
    "remap_labels", "run_layers", "train", "train_layer_step", "build_local_layers", "build_model", "epoch_inputs", "valid_inputs",
]
