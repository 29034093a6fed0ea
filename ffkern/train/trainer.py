"""The training run behind ``ffkern train``: configuration, stage 1 (layer-local or BP), stage 2
(linear head or FF's try-every-label), evaluation, metrics."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import __version__
from .._backend import resolve
from .._checks import check_choice, check_number
from .._cliargs import layer_indices
from . import checkpoint, rng
from .bp import make_bp, train_bp
from .data import Augment, Dataset, batches, check_data_config, dataset_for, input_abs_max, load_dataset  # noqa: F401
from .heads import accuracy, class_goodness_logits, goodness_logits, layer_features, train_linear_head
from .conv_models import CONV_MODELS, NORMS, block_channels, check_depth, default_depth
from .layerwise import LocalLayer, make_local_layers, olu_train_step, run_layers
from .methods import FF_FAMILY, METHODS, LayerBatch, first_batch, make_objective, default_sffa_activity
from .metrics import History, format_table
from .models import MODELS, Encoder, build_encoder, default_label_encoding, default_sffa_topk
from .schedules import SCHEDULES, margin_schedule

# Defaults per (method, model) that make the plain command the good run on the bundled digits
# (measured on a 2-core CPU, see the README); any explicit option overrides them.
DEFAULTS = {
    ("cff", "mlp"): dict(epochs=30, lr=1e-3, width=500, layers=3),
    ("cff", "vit"): dict(epochs=30, lr=1e-3, width=64, layers=3),
    ("ff", "mlp"): dict(epochs=60, lr=1e-3, width=500, layers=3),
    ("ff", "vit"): dict(epochs=30, lr=3e-3, width=64, layers=3),
    ("symba", "mlp"): dict(epochs=60, lr=1e-3, width=500, layers=3),
    ("symba", "vit"): dict(epochs=30, lr=3e-3, width=64, layers=3),
    ("sffa", "mlp"): dict(epochs=60, lr=1e-3, width=500, layers=3),
    ("sffa", "vit"): dict(epochs=30, lr=3e-3, width=64, layers=3),
    ("bp", "mlp"): dict(epochs=30, lr=1e-3, width=500, layers=3),
    ("bp", "vit"): dict(epochs=30, lr=1e-3, width=64, layers=3),
}
# Conv models (conv_models.py): width is a channel multiplier; depth the number of blocks.
CONV_DEFAULTS = {"cnn": dict(epochs=20, lr=1e-3, width=0.25), "resnet18": dict(epochs=10, lr=1e-3, width=0.25),
                 "mobilenetv3": dict(epochs=10, lr=3e-3, width=0.5)}  # 1e-3: 87 % on digits with seed 1
for _model, _d in CONV_DEFAULTS.items():
    for _method in METHODS:
        DEFAULTS[(_method, _model)] = dict(_d, layers=default_depth(_model))


SELECT_ENCODER = ("best-valid", "last")
# Options a resumed run may change (checkpoint): the length of the run, and where the data's files
# are now; every other option must be the saved run's, or the continuation would be another run.
RESUME_MAY_CHANGE = ("epochs", "threads", "data_dir", "cpu_heap", "probe")


@dataclass
class TrainConfig:
    method: str = "cff"
    model: str = "mlp"
    dataset: str = "digits"
    epochs: Optional[int] = None  # None: the (method, model) default in DEFAULTS
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    lr: Optional[float] = None
    weight_decay: float = 0.0
    width: Optional[float] = None  # E (an int) for mlp/vit; the channel multiplier for the conv models
    layers: Optional[int] = None  # L, the number of layers (blocks); --layers (older keyword: depth)
    heads: int = 4  # H (ViT)
    patch_size: Optional[int] = None  # ViT; None: the image side / 4 (16 patches)
    views: int = 2  # CFF views per batch; 1 = one-forward mode
    temperature: float = 0.15
    margin_schedule: str = "linear"  # CFF's per-layer margins; --margin-schedule (older keyword: schedule)
    m0: float = 0.4
    mL: float = 0.1
    k: float = 1.0  # CFF's schedule exponent (parabolic, cosine, exponential; schedules.py)
    threshold: float = 2.0  # FF
    alpha: float = 4.0  # SymBa
    shift: Optional[int] = None  # the older name of crop_pad (either may be given; resolved() sets both)
    noise: float = 0.2  # augmentation: Gaussian noise std (inputs are standardized)
    crop_pad: Optional[int] = None  # augmentation: random crop of the image zero-padded this much; None: default_shift
    flip: Optional[bool] = None  # augmentation: horizontal flips; None: on for RGB images, off otherwise
    rotate: float = 0.0  # augmentation: random rotation in [-rotate, rotate] degrees
    randaug: Optional[Tuple[int, int]] = None  # augmentation: RandAugment (N ops, magnitude M of 30), or "N,M"
    data_dir: Optional[str] = None  # the folder of a named dataset's files (mnist, cifar10, ..., folder)
    label_noise: float = 0.0  # protocol: fraction of training labels set to a random other class
    train_fraction: float = 1.0  # protocol: seeded stratified fraction of the training split kept
    topk: Optional[int] = None  # also report the top-k test accuracy (test_top{k}_accuracy)
    head_epochs: int = 30
    head_lr: float = 1e-2
    ff_predict: str = "goodness"  # "goodness" (try every label) or "head"
    ff_predict_layers: str = "all"  # goodness prediction: the layers summed (sff: averaged): all, last, 1:, 0,2, ...
    valid_fraction: float = 0.1
    bf16: bool = False  # autocast the layers to bfloat16 (GPU only)
    compile: bool = False  # torch.compile every layer
    backend: str = "auto"  # ffkern loss backend
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    cpu_heap: bool = True  # CPU runs: reuse freed memory (ffkern.cpu_heap; large activations without page faults)
    sffa_topk: Optional[int] = None  # SFFA MLP: keep the k largest of each half (None: 15 for sffa on the MLP; 0: off)
    ff_label: Optional[str] = None  # MLP FF label: "onehot" or "pattern" (None: pattern for sffa, else onehot)
    sffa_activity: Optional[bool] = None  # sffa: the authors' activity factor (None: on where layers end in a ReLU)
    vit_l2: Optional[bool] = None  # FF family on the ViT: L2-normalize the token output between layers (None: on)
    probe: bool = True  # per layer: the validation Fisher criterion each epoch, a linear probe at the end (probe.py)
    olu: bool = False  # overlapping local updates (the Trifecta): a block's loss also trains its predecessor
    norm: str = "batch"  # the cnn's block norm: "batch" (BatchNorm2d, the Trifecta's) or "layer" (LayerNorm([C,H,W]))
    class_scale: float = 1.0  # sff: initial value of each block's learned scale of the class goodness
    channels_last: bool = False  # conv models: weights and maps stored channels-last (NHWC)
    select_encoder: str = "best-valid"  # "best-valid": the epoch of the lowest last-layer valid loss (CFF); "last"

    def resolved(self) -> "TrainConfig":
        """Checks every option (ValueError/TypeError naming it) and fills the defaults."""
        check_choice("method", self.method, METHODS)
        check_choice("model", self.model, MODELS)
        check_choice("margin_schedule", self.margin_schedule, SCHEDULES)
        check_choice("ff_predict", self.ff_predict, ("goodness", "head"))
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_choice("norm", self.norm, NORMS)
        check_choice("select_encoder", self.select_encoder, SELECT_ENCODER)
        if self.method == "sff" and self.model not in CONV_MODELS:
            raise ValueError(f"method 'sff' (the per-class conv loss) needs a conv model: --model {', '.join(CONV_MODELS)};"
                             f" got {self.model!r}")
        if self.sffa_topk and (self.method != "sffa" or self.model != "mlp"):
            raise ValueError(f"sffa_topk (--sffa-topk) is SFFA's layer on the MLP (the authors have it nowhere else);"
                             f" got method {self.method!r}, model {self.model!r}")
        if self.sffa_topk is not None and (isinstance(self.sffa_topk, bool) or not isinstance(self.sffa_topk, int)
                                           or self.sffa_topk < 0):
            raise ValueError(f"sffa_topk (--sffa-topk) must be an int >= 0 (0: off), got {self.sffa_topk!r}")
        if self.ff_label is not None:
            check_choice("ff_label", self.ff_label, ("onehot", "pattern"))
            if self.method not in FF_FAMILY or self.model != "mlp":
                raise ValueError(f"ff_label (--ff-label) chooses the FF family's label input on the MLP; got method"
                                 f" {self.method!r}, model {self.model!r}")
        if self.sffa_activity and self.method != "sffa":
            raise ValueError(f"sffa_activity (--sffa-activity) is SFFA's loss factor; got method {self.method!r}")
        if self.vit_l2 is not None and (self.method not in FF_FAMILY or self.model != "vit"):
            raise ValueError(f"vit_l2 (--vit-l2 / --no-vit-l2) is the FF family's hand-over between ViT layers; got"
                             f" method {self.method!r}, model {self.model!r}")
        filled = dataclasses.replace(self, **{k: v for k, v in DEFAULTS[(self.method, self.model)].items() if getattr(self, k) is None})
        conv = filled.model in CONV_MODELS
        if conv:
            check_number("width", filled.width, low=0.0, low_open=True)  # a channel multiplier
            check_depth(filled.model, filled.layers)
        for name in ("epochs", "batch_size", "layers", "heads", "head_epochs", "threads") + (() if conv else ("width",)):
            v = getattr(filled, name)
            if v is None and name == "threads":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("seed", "shift"):
            v = getattr(filled, name)
            if v is None and name == "shift":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if filled.views not in (1, 2) or isinstance(filled.views, bool):
            raise ValueError(f"views must be 1 (one-forward mode) or 2, got {filled.views!r}")
        check_number("lr", filled.lr, low=0.0, low_open=True)
        check_number("head_lr", filled.head_lr, low=0.0, low_open=True)
        check_number("weight_decay", filled.weight_decay, low=0.0)
        check_number("temperature", filled.temperature, low=0.0, low_open=True)
        check_number("noise", filled.noise, low=0.0)
        check_number("threshold", filled.threshold)
        check_number("alpha", filled.alpha, low=0.0, low_open=True)
        margin_schedule(filled.margin_schedule, filled.layers, filled.m0, filled.mL, filled.k)  # checks m0, mL and k
        p = filled.patch_size
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"patch_size must be an int >= 1, got {p!r}")
        check_number("class_scale", filled.class_scale, low=0.0, low_open=True)
        if not isinstance(filled.ff_predict_layers, str):
            raise TypeError(f"ff_predict_layers must be a str such as 'all', 'last', '1:' or '0,2', got"
                            f" {type(filled.ff_predict_layers).__name__}")
        try:
            layer_indices(filled.ff_predict_layers, filled.layers)
        except ValueError as exc:
            raise ValueError(f"ff_predict_layers (--ff-predict-layers): {exc}") from None
        if filled.ff_predict_layers != "all" and (filled.method not in FF_FAMILY + ("sff",) or filled.ff_predict != "goodness"):
            raise ValueError(f"ff_predict_layers={filled.ff_predict_layers!r} (--ff-predict-layers) chooses the layers of"
                             f" the goodness prediction (--method ff, symba, sffa or sff with --ff-predict goodness);"
                             f" method {filled.method!r} with ff_predict {filled.ff_predict!r} has none")
        if filled.olu and filled.method == "bp":
            raise ValueError("olu=True (--olu) is a schedule of local updates; method 'bp' has none (use --method symba,"
                             " ff, sffa, cff or sff)")
        if filled.channels_last and not conv:
            raise ValueError(f"channels_last=True (--channels-last) is a memory layout of the conv models' maps; model"
                             f" {filled.model!r} has none")
        if filled.norm != "batch" and filled.model != "cnn":
            raise ValueError(f"norm={filled.norm!r} (--norm) chooses the cnn's block norm; model {filled.model!r} has its own")
        if filled.sffa_topk and (filled.width % 2 or filled.sffa_topk > filled.width // 2):
            raise ValueError(f"sffa_topk (--sffa-topk) {filled.sffa_topk} keeps that many units of each half of a layer:"
                             f" the width (--width) {filled.width} must be even with halves of at least that many")
        if filled.model == "vit" and filled.width % filled.heads:  # attention splits E into H equal heads
            raise ValueError(f"width (--width) E={filled.width} must be divisible by heads (--heads) H={filled.heads} for the ViT")
        return check_data_config(filled)  # data, augmentation and protocol options (data.py)


# TrainConfig's fields are named as the ``ffkern train`` options that set them (--layers: layers,
# --margin-schedule: margin_schedule); the older keyword names still work, with a DeprecationWarning.
RENAMED_FIELDS = {"depth": "layers", "schedule": "margin_schedule"}


def _accept_old_names(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for old, new in RENAMED_FIELDS.items():
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"TrainConfig got both {old}= and {new}=; {old} is the older name of {new}: give {new}")
                warnings.warn(f"TrainConfig({old}=...) is deprecated: the field is {new} now (as the option"
                              f" {config_flag(new)})", DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
        init(self, *args, **kwargs)

    return __init__


def _old_name(old: str, new: str) -> property:
    def get(self):
        warnings.warn(f"TrainConfig.{old} is deprecated: read TrainConfig.{new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(get, doc=f"Deprecated: the older name of {new}.")


TrainConfig.__init__ = _accept_old_names(TrainConfig.__init__)
for _old, _new in RENAMED_FIELDS.items():
    setattr(TrainConfig, _old, _old_name(_old, _new))


def default_shift(sample_shape) -> int:
    """Random-shift augmentation by default: none for small images like the 8x8 digits (one pixel
    is 12% of the image; in our digits runs a 1-pixel shift lowered the test accuracy of cff,
    ff and symba on the MLP and of cff on the ViT),
    side/8 for larger ones (4 for 32x32: the usual random-crop padding), none for vectors."""
    if len(sample_shape) != 3 or min(sample_shape[1:]) < 16:
        return 0
    return min(sample_shape[1:]) // 8


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' (--device cuda) was asked for, but torch sees no CUDA device (use --device cpu)")
    return torch.device(name)


def check_compatible(cfg: TrainConfig, data: Dataset) -> None:
    """The checks of a (resolved) config that need the data, raised as ValueError before any
    model is built or step taken (the encoders check the same again for direct callers)."""
    if math.prod(data.sample_shape) == 0:
        raise ValueError(f"dataset {data.name} has samples of shape {list(data.sample_shape)}: 0 input values,"
                         f" nothing to learn from")
    if cfg.method == "cff" and cfg.batch_size < 2:
        raise ValueError(f"method 'cff' with batch_size {cfg.batch_size} (--batch-size): a batch of one sample has no"
                         f" negatives, so its contrastive loss is identically 0 and nothing is learned; use 2 or more"
                         f" (CFF's runs use 128 to 512)")
    if cfg.method in FF_FAMILY and data.num_classes < 2:
        raise ValueError(f"method {cfg.method!r} needs at least 2 classes (its negatives carry a wrong label), but"
                         f" dataset {data.name} has {data.num_classes}")
    if cfg.model == "vit":
        if len(data.sample_shape) != 3:
            raise ValueError(f"model 'vit' (--model vit) needs image inputs [N, C, H, W] or [N, H, W], but dataset"
                             f" {data.name} holds vectors of shape {list(data.sample_shape)}; use --model mlp")
        patch = cfg.patch_size or default_patch(data.sample_shape)
        h, w = data.sample_shape[1:]
        if h % patch or w % patch:
            raise ValueError(f"patch_size (--patch-size) {patch} must divide the image size {h}x{w} of dataset {data.name}")
    if cfg.model in CONV_MODELS and len(data.sample_shape) != 3:
        raise ValueError(f"model {cfg.model!r} needs image inputs [N, C, H, W] or [N, H, W], but dataset {data.name}"
                         f" holds vectors of shape {list(data.sample_shape)}; use --model mlp")
    if cfg.method == "sffa" and cfg.model in CONV_MODELS:
        odd = [l for l, c in enumerate(block_channels(cfg.model, cfg.width, cfg.layers)) if c % 2]
        if odd:
            raise ValueError(f"method 'sffa' splits each block's channels into two halves, but with width (--width)"
                             f" {cfg.width} block(s) {odd} of model {cfg.model!r} have an odd number of channels")
    if cfg.model == "mlp" and cfg.method in FF_FAMILY:
        inputs = math.prod(data.sample_shape)
        if data.num_classes > inputs:
            raise ValueError(f"method {cfg.method!r} on the MLP puts the label one-hot in the first inputs, but dataset"
                             f" {data.name} has {data.num_classes} classes and only {inputs} input values")


def dataset_warnings(data: Dataset) -> List[str]:
    """What a careful user would want to know before a run whose result it spoils: classes of the
    validation or test split that the training split never shows (no method can predict them;
    they still count in the head's size and in the accuracy)."""
    seen = torch.bincount(data.y_train.cpu(), minlength=data.num_classes) > 0
    notes = []
    for split, labels in (("test", data.y_test), ("validation", data.y_valid)):
        labels = labels.cpu()
        unseen = labels[~seen[labels]]
        if unseen.numel():
            classes = sorted(set(unseen.tolist()))
            shown = ", ".join(map(str, classes[:10])) + (", ..." if len(classes) > 10 else "")
            notes.append(f"{unseen.numel()} of {labels.numel()} {split} samples have classes ({shown}; as class indices"
                         f" after remapping) that the training set never shows: no method can predict them")
    return notes


def _progress(epochs: int, desc: str, enabled: bool, start: int = 0):
    """The epochs ``start`` .. ``epochs``-1, as a tqdm bar that counts from ``start`` (a resumed run)."""
    if not enabled:
        return range(start, epochs)
    from tqdm.auto import tqdm

    return tqdm(range(start, epochs), desc=desc, unit="epoch", dynamic_ncols=True, initial=start, total=epochs)


def default_patch(sample_shape) -> int:
    """ViT patch side by default: a 4 x 4 grid of patches (16 tokens; 2x2 pixels on the digits)."""
    if len(sample_shape) != 3:
        raise ValueError("model 'vit' needs image inputs [N, C, H, W]; this dataset holds vectors")
    return max(1, sample_shape[-1] // 4)


def default_topk(cfg: TrainConfig) -> Optional[int]:
    """SFFA's top-k per half by default (15 for sffa on the MLP), where the layer's halves are
    larger than k (a narrower layer would keep every unit: no top-k then)."""
    k = default_sffa_topk(cfg.method, cfg.model)
    return k if k is not None and cfg.width % 2 == 0 and cfg.width // 2 > k else None


def build_model(cfg: TrainConfig, data: Dataset) -> Encoder:
    """The encoder of a (resolved) config, on the data's device. Deterministic in cfg.seed, layer by
    layer (rng.INIT streams), so every process of a pipeline can build it and keep its own layers."""
    patch = (cfg.patch_size or default_patch(data.sample_shape)) if cfg.model == "vit" else 1
    label_scale = input_abs_max(data.x_train) if cfg.method in FF_FAMILY else 1.0  # FF's label: a bright "pixel"
    encoder = build_encoder(cfg.model, data.sample_shape, data.num_classes, width=cfg.width, depth=cfg.layers,
                            heads=cfg.heads, patch_size=patch, label_input=cfg.method in FF_FAMILY,
                            label_scale=label_scale, seed=cfg.seed, norm=cfg.norm,
                            sffa_topk=default_topk(cfg) if cfg.sffa_topk is None else (cfg.sffa_topk or None),
                            label_encoding=(cfg.ff_label or default_label_encoding(cfg.method, cfg.model))
                            if cfg.model == "mlp" else "onehot",
                            normalize_between=cfg.vit_l2 if cfg.model == "vit" else None)
    if cfg.channels_last:
        encoder.set_channels_last()
    return encoder.to(data.x_train.device)


def build_augment(cfg: TrainConfig, data: Dataset) -> Augment:
    """The augmentation of a config on ``data``: crop padding default_shift unless given, flips by
    default for RGB images only (CIFAR, SVHN; not digits or MNIST, where a flip changes the class),
    the dataset's pixel statistics for black padding and RandAugment's colour ops."""
    crop = cfg.crop_pad if cfg.crop_pad is not None else cfg.shift
    flip = cfg.flip if cfg.flip is not None else (data.is_image and data.sample_shape[0] == 3)
    return Augment(default_shift(data.sample_shape) if crop is None else crop, cfg.noise, flip=flip,
                   rotate=cfg.rotate, randaug=cfg.randaug, pixel_mean=data.pixel_mean, pixel_std=data.pixel_std)


def layer_margins(cfg: TrainConfig):
    """CFF: the margin schedule; other methods: None per layer."""
    if cfg.method != "cff":
        return [None] * cfg.layers
    return margin_schedule(cfg.margin_schedule, cfg.layers, cfg.m0, cfg.mL, cfg.k)


def build_local_layers(cfg: TrainConfig, encoder: Encoder, indices: Optional[Sequence[int]] = None) -> List[LocalLayer]:
    """LocalLayers (own AdamW, own objective) for the contiguous layer indices ``indices`` (default:
    all): a pipeline stage builds only its group."""
    indices = list(range(cfg.layers)) if indices is None else list(indices)
    if not indices or indices != list(range(indices[0], indices[0] + len(indices))) or not 0 <= indices[0] <= indices[-1] < cfg.layers:
        raise ValueError(f"indices must be a non-empty contiguous range inside 0..{cfg.layers - 1}, got {indices}")
    margins = layer_margins(cfg)
    objectives = [make_objective(cfg.method, encoder, margins[l], temperature=cfg.temperature, threshold=cfg.threshold,
                                 alpha=cfg.alpha, backend=cfg.backend, layer=l, seed=cfg.seed,
                                 class_scale=cfg.class_scale,
                                 sffa_activity=default_sffa_activity(cfg.method, cfg.model) if cfg.sffa_activity is None
                                 else cfg.sffa_activity) for l in indices]
    return make_local_layers([encoder.layers[l] for l in indices], objectives, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             first_index=indices[0], autocast_dtype=torch.bfloat16 if cfg.bf16 else None,
                             compile=cfg.compile, olu=cfg.olu)


def epoch_inputs(cfg: TrainConfig, encoder: Encoder, data: Dataset, augment: Augment, epoch: int) -> Iterator[LayerBatch]:
    """The first layer's inputs for every batch of ``epoch`` (shuffling, views, negatives from the
    seeded streams): what the first stage of a pipeline feeds in."""
    for step, idx in enumerate(batches(len(data.y_train), cfg.batch_size, cfg.seed, epoch)):
        idx = idx.to(data.x_train.device)
        yield first_batch(cfg.method, encoder, data.x_train[idx], data.y_train[idx], augment=augment,
                          num_views=cfg.views, seed=cfg.seed, epoch=epoch, step=step)


def valid_batch_size(cfg: TrainConfig) -> int:
    """Validation batches are at least 256 samples (no update happens, so bigger is just faster)."""
    return max(cfg.batch_size, 256)


def valid_inputs(cfg: TrainConfig, encoder: Encoder, data: Dataset, augment: Augment) -> Iterator[LayerBatch]:
    """Validation batches: the same views and negatives every epoch (epoch key 0 of the VALID
    stream), so that the validation curves compare across epochs."""
    for step, idx in enumerate(batches(len(data.y_valid), valid_batch_size(cfg), cfg.seed, 0, shuffle=False)):
        idx = idx.to(data.x_valid.device)
        yield first_batch(cfg.method, encoder, data.x_valid[idx], data.y_valid[idx], augment=augment,
                          num_views=cfg.views, seed=cfg.seed, epoch=0, step=step, purpose=rng.VALID)


def train(config: TrainConfig = TrainConfig(), *, progress: bool = True, log: Callable[[str], None] = print,
          data: Optional[Dataset] = None, save: Optional[str] = None, resume: Optional[str] = None) -> Dict:
    """Runs one training and returns the metrics dict (see README: Training).

    ``save``: a folder that receives the checkpoint after every epoch and the finished run
    (checkpoint.py); ``resume``: a saved run's folder to continue, exactly: ``config`` must be the
    saved run's, except for RESUME_MAY_CHANGE (``epochs`` extends the run)."""
    cfg = config.resolved()
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    threads = apply_device_options(cfg, device, log)
    autocast_dtype = torch.bfloat16 if cfg.bf16 else None
    backend_name = resolve(cfg.backend, device).name
    if cfg.method == "sff":  # the per-class loss: the backend that has its kernel (BackendUnavailable if none)
        backend_name = per_class_backend(cfg.backend, device)
    data = dataset_for(cfg, data).to(device)  # loaded unless given, with the protocol (label noise, fraction)
    check_compatible(cfg, data)
    saved = None
    if resume is not None:
        saved = checkpoint.load(resume, map_location=device)
        check_resume(cfg, saved["meta"], data, resume)
    if save is not None:
        check_save_folder(save, resume)
    log(f"ffkern train: {cfg.method} on {cfg.model} | {data.summary()} | device {device}, loss backend {backend_name}")
    notes = dataset_warnings(data)
    for note in notes:
        log(f"warning: {note}")
    encoder = build_model(cfg, data)
    augment = build_augment(cfg, data)
    run = Stage1(cfg, encoder, data)
    start = 0
    if saved is not None:
        start = run.restore(saved)
        log(f"resuming {resume}: {start} of {cfg.epochs} epochs done")
    bar = _progress(cfg.epochs, f"{cfg.method}/{cfg.model}", progress, start)

    def end_of_epoch(epoch: int) -> None:
        run.selector.update(epoch, run.history)
        if save is not None:
            checkpoint.save(save, run.meta(epoch + 1, finished=False), run.tensors())

    if cfg.method == "bp":
        train_bp(encoder, run.bp_head, run.optimizers[0], data, run.history, epochs=bar, batch_size=cfg.batch_size,
                 augment=augment, seed=cfg.seed, autocast_dtype=autocast_dtype, end_of_epoch=end_of_epoch)
    else:
        stage1(cfg, encoder, run.layers, data, augment, run.history, bar, log, end_of_epoch=end_of_epoch)
    last_state = run.tensors() if save is not None else None  # the last epoch's weights: what a resume continues
    selection = run.selector.select()
    result = predict_all(cfg, encoder, run, data, autocast_dtype)
    head = result.pop("_head", None)
    if cfg.probe:  # of the selected encoder, as prediction uses it
        from .probe import probe_encoder

        # no validation split: empty features of the right width (the probe keeps its last epoch)
        feats = None if len(data.y_valid) else {"valid": [f[:0] for f in layer_features(encoder, data.x_train[:1])]}
        probes = probe_encoder(encoder, data, seed=cfg.seed, autocast_dtype=autocast_dtype, features=feats)
        run.history.set_probe(probes if len(probes) == len(run.history.names) else probes[-1:])  # bp: one entry

    metrics = run_metrics(cfg, data, encoder, augment, run.history, result, backend_name, device, t0, log)
    metrics["warnings"] = notes
    metrics["selection"] = {"encoder": selection, "head": head_selection(result.get("head"))}
    metrics["threads"] = threads
    if save is not None:
        meta = run.meta(cfg.epochs, finished=True)
        meta.update(metrics=metrics, head_dim=None if head is None else int(head[0].normalized_shape[0]))
        checkpoint.save(save, meta, {**last_state, "head": None if head is None else head.state_dict()})
        log(f"run saved to {save}")
    return metrics


class Stage1:
    """The state of stage 1 that a checkpoint holds: the encoder, the layers with their objectives
    and optimizers (bp: the head and its optimizer), the history and the encoder selection."""

    def __init__(self, cfg: TrainConfig, encoder: Encoder, data: Dataset):
        self.cfg, self.encoder, self.data = cfg, encoder, data
        self.modules: Dict[str, torch.nn.Module] = {"encoder": encoder}
        if cfg.method == "bp":
            self.layers = []
            self.bp_head, opt = make_bp(encoder, data.num_classes, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed)
            self.optimizers = [opt]
            self.modules["bp_head"] = self.bp_head
            self.history = History(["end-to-end"])
        else:
            self.layers = build_local_layers(cfg, encoder)
            self.bp_head = None
            self.optimizers = [layer.optimizer for layer in self.layers]
            for l, layer in enumerate(self.layers):
                if isinstance(layer.objective, torch.nn.Module):  # sff's per-class 1x1 conv
                    self.modules[f"objective{l}"] = layer.objective
            self.history = History([f"layer {l}" for l in range(cfg.layers)], layer_margins(cfg))
        self.selector = EncoderSelector(cfg.select_encoder, self.modules)

    def tensors(self) -> Dict:
        return {"modules": {k: checkpoint.state_dict_copy(m) for k, m in self.modules.items()},
                "optimizers": [opt.state_dict() for opt in self.optimizers], "best": self.selector.snapshot}

    def meta(self, epochs_done: int, finished: bool) -> Dict:
        return {"config": dataclasses.asdict(self.cfg), "epochs_done": epochs_done, "finished": finished,
                "history": self.history.to_json(), "data": checkpoint.data_fingerprint(self.data),
                "selection": self.selector.state(), "encoder_attrs": encoder_attrs(self.encoder),
                "ffkern": __version__, "metrics": None}

    def restore(self, saved: Dict) -> int:
        """Loads a checkpoint's state; returns the number of epochs done."""
        meta = saved["meta"]
        for name, module in self.modules.items():
            module.load_state_dict(saved["modules"][name])
        for opt, state in zip(self.optimizers, saved["optimizers"]):
            opt.load_state_dict(state)
        self.history = History.from_json(meta["history"])
        self.selector.restore(meta["selection"], saved.get("best"))
        return int(meta["epochs_done"])


def encoder_attrs(encoder: Encoder) -> Dict:
    """What an encoder holds outside its state dict (the MLP's FF label brightness, from the data)."""
    return {"label_scale": encoder.label_scale} if hasattr(encoder, "label_scale") else {}


class EncoderSelector:
    """Model selection as CFF does (``select_encoder="best-valid"``): after every epoch, if the last
    layer's validation loss is the lowest so far (the first such epoch on ties), a copy of the
    weights of ``modules`` (the encoder, sff's objectives, bp's head) is kept in memory, one per
    improvement, never per step; ``select()`` loads it back for prediction. "last" keeps the last
    epoch. Without a validation split (or a finite loss) it is the last epoch, and says so."""

    def __init__(self, mode: str, modules: Dict[str, torch.nn.Module]):
        self.mode, self.modules = mode, modules
        self.best_epoch: Optional[int] = None
        self.best_loss: Optional[float] = None
        self.last_epoch: Optional[int] = None
        self.snapshot: Optional[Dict] = None

    def update(self, epoch: int, history: History) -> None:
        self.last_epoch = epoch
        if self.mode != "best-valid":
            return
        loss = history.last(len(history.names) - 1, "valid_loss")
        if loss is not None and math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss):
            self.best_epoch, self.best_loss = epoch, loss
            self.snapshot = {k: checkpoint.state_dict_copy(m) for k, m in self.modules.items()}

    def state(self) -> Dict:
        return {"mode": self.mode, "best_epoch": self.best_epoch, "best_valid_loss": self.best_loss,
                "last_epoch": self.last_epoch}

    def restore(self, state: Dict, snapshot: Optional[Dict]) -> None:
        self.best_epoch, self.best_loss, self.last_epoch = state["best_epoch"], state["best_valid_loss"], state["last_epoch"]
        self.snapshot = snapshot

    def select(self) -> Dict:
        """Loads the selected epoch's weights; returns what the metrics record of the choice
        (epochs counted from 0, as the head's best_epoch)."""
        out = {"mode": self.mode, "criterion": "validation loss of the last layer", "epoch": self.last_epoch,
               "valid_loss": None}
        if self.mode == "last":
            out["criterion"] = "the last epoch (select_encoder='last')"
        elif self.snapshot is None:
            out["criterion"] = "the last epoch: no validation split (or no finite validation loss) to select by"
        else:
            for name, module in self.modules.items():
                module.load_state_dict(self.snapshot[name])
            out.update(epoch=self.best_epoch, valid_loss=self.best_loss)
        return out


def head_selection(head_info: Optional[Dict]) -> Optional[Dict]:
    """The stage-2 head's selection, as recorded by train_linear_head (None: no trained head)."""
    if not head_info or "best_epoch" not in head_info:
        return None
    return {"criterion": head_info.get("selected_by"), "epoch": head_info["best_epoch"]}


def check_resume(cfg: TrainConfig, meta: Dict, data: Dataset, folder: str) -> None:
    """A resumed run must continue the saved one: the same options (but RESUME_MAY_CHANGE), no
    fewer epochs than done, and the same data (ValueError saying what differs)."""
    saved, mine = meta["config"], json.loads(json.dumps(dataclasses.asdict(cfg)))
    diffs = [f"{config_flag(k)} {mine.get(k)!r} (saved: {saved.get(k)!r})" for k in sorted(set(saved) | set(mine))
             if k not in RESUME_MAY_CHANGE and mine.get(k) != saved.get(k)]
    if diffs:
        raise ValueError(f"--resume {folder}: these options differ from the saved run's: {'; '.join(diffs)}. A resumed"
                         f" run continues the saved one with its options: drop them (only --epochs, to extend the run,"
                         f" --threads and --data-dir may change), or start a new run")
    if cfg.epochs < meta["epochs_done"]:
        raise ValueError(f"--resume {folder}: --epochs {cfg.epochs} is fewer than the {meta['epochs_done']} epochs the"
                         f" saved run has done")
    mine_data = checkpoint.data_fingerprint(data)
    if mine_data != meta["data"]:
        keys = [k for k in mine_data if mine_data[k] != meta["data"].get(k)]
        raise ValueError(f"--resume {folder}: the dataset differs from the saved run's ({', '.join(keys)}: "
                         + "; ".join(f"{mine_data[k]!r} here, {meta['data'].get(k)!r} saved" for k in keys) + ")")


def check_save_folder(save: str, resume: Optional[str]) -> None:
    """A new run must not overwrite another saved run (resuming writes on in its own folder)."""
    same = resume is not None and os.path.abspath(save) == os.path.abspath(resume)
    if checkpoint.holds_run(save) and not same:
        raise ValueError(f"--save {save}: the folder already holds a saved run; continue it with --resume {save}, or"
                         f" give another folder")
    if os.path.exists(save) and not os.path.isdir(save):
        raise ValueError(f"--save {save}: not a folder")


def config_flag(field: str) -> str:
    """The ``ffkern train`` option of a TrainConfig field."""
    return {"valid_fraction": "valid_fraction"}.get(field, "--" + field.replace("_", "-"))


def check_device_options(cfg: TrainConfig, device: torch.device) -> None:
    """The options that depend on the device (ValueError naming the option)."""
    if cfg.bf16 and device.type != "cuda":
        raise ValueError("bf16=True (--bf16) autocasts on a GPU; on the CPU it is not offered (use --device cuda)")


def apply_device_options(cfg: TrainConfig, device: torch.device, log: Optional[Callable[[str], None]] = None) -> Dict:
    """Checks the options that depend on the device and sets torch's CPU threads (choose_threads);
    returns what the metrics record of the choice."""
    check_device_options(cfg, device)
    info = choose_threads(cfg, device, log)
    from .. import cpu_heap

    if cfg.cpu_heap and device.type == "cpu":
        cpu_heap.reuse_freed_cpu_memory()  # process-wide; does nothing where glibc is absent
    info["cpu_heap_reuse"] = cpu_heap.applied()  # in effect in this process (an earlier run may have set it)
    return info


# torch's own thread count for this machine (or OMP_NUM_THREADS), before any run changed it
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def machine_load() -> Optional[float]:
    """The 1-minute load average (processes running or waiting for a core), None where the
    system has none. It counts this process too, so a second run in one Python process sees
    the first one's work: the choice errs towards fewer threads, never more than torch's."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def choose_threads(cfg: TrainConfig, device: torch.device, log: Optional[Callable[[str], None]] = None) -> Dict:
    """torch's CPU threads: ``cfg.threads`` when given; else, for a CPU run, as many as the cores
    that other processes leave idle (the load average rounded, taken from the cores; at least 1,
    at most torch's default). On a loaded 2-core machine torch's 2 threads ran 4-34x slower than 1,
    as each waits for the other's core. OMP_NUM_THREADS, when set, is the user's choice and kept.
    Logs one line when it picks fewer threads than torch would."""
    cores = os.cpu_count() or 1
    info = {"threads": None, "chosen_by": None, "load_average_1min": None, "cores": cores,
            "torch_default": TORCH_DEFAULT_THREADS}
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
        info.update(chosen_by="--threads")
    elif device.type != "cpu":
        info.update(chosen_by="torch's default (a GPU run)")
    elif os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(TORCH_DEFAULT_THREADS)
        info.update(chosen_by="OMP_NUM_THREADS")
    else:
        load = machine_load()
        info["load_average_1min"] = load
        if load is None:
            torch.set_num_threads(TORCH_DEFAULT_THREADS)
            info.update(chosen_by="torch's default (no load average on this system)")
        else:
            idle = max(1, cores - int(load + 0.5))
            threads = max(1, min(TORCH_DEFAULT_THREADS, idle))
            torch.set_num_threads(threads)
            info.update(chosen_by="idle cores (load average)")
            if threads < TORCH_DEFAULT_THREADS and log is not None:
                log(f"ffkern train: the machine is busy (load average {load:.2f} on {cores} cores): using {threads} CPU"
                    f" thread{'s' if threads > 1 else ''} instead of torch's {TORCH_DEFAULT_THREADS}, which would wait"
                    f" for each other's cores; --threads N sets the number")
    info["threads"] = torch.get_num_threads()
    return info


def run_metrics(cfg: TrainConfig, data: Dataset, encoder, augment: Augment, history: History, result: Dict,
                backend_name: str, device, t0: float, log: Callable[[str], None]) -> Dict:
    """Logs the end table and accuracies, and returns the metrics dict of a finished run."""
    wall = time.perf_counter() - t0
    log("\n" + format_table(history))
    log(f"test accuracy {100 * result['test_accuracy']:.2f}% (valid {100 * result['valid_accuracy']:.2f}%), wall time {wall:.1f} s")
    patch = getattr(encoder, "patch", None)
    return {
        "test_accuracy": result["test_accuracy"],
        **{k: v for k, v in result.items() if k.startswith("test_top")},
        "valid_accuracy": result["valid_accuracy"],
        "method": cfg.method, "model": cfg.model, "dataset": data.name,
        "num_train": len(data.y_train), "num_valid": len(data.y_valid), "num_test": len(data.y_test),
        "backend": backend_name, "device": str(device), "torch_threads": torch.get_num_threads(), "wall_time_s": wall,
        "layers": history.to_json(),
        "head": result.get("head"),
        "config": dataclasses.asdict(cfg) | {"patch_size": patch, "shift": augment.shift} | augment.describe()
                  | {old: getattr(cfg, new) for old, new in RENAMED_FIELDS.items()},  # the older keys stay
        "protocol": {"label_noise": 0.0, "train_fraction": 1.0, "num_train_full": len(data.y_train),
                     "num_train": len(data.y_train), "noisy_train_labels": 0} | data.protocol,
        "versions": {"ffkern": __version__, "torch": torch.__version__},
    }


def stage1(cfg: TrainConfig, encoder, layers, data: Dataset, augment: Augment, history: History, bar,
           log: Callable[[str], None] = print, end_of_epoch: Optional[Callable[[int], None]] = None) -> None:
    """Layer-local epochs: every batch goes through the layers in order, each layer updating at
    once. ``bar`` gives the epochs to run (a resumed run starts after the saved ones);
    ``end_of_epoch(epoch)`` runs after each (selection, checkpoint)."""
    warned = set()
    for epoch in bar:
        for step, batch in enumerate(epoch_inputs(cfg, encoder, data, augment, epoch)):
            _, stats = olu_train_step(layers, batch, step) if cfg.olu else run_layers(layers, batch, train=True)
            for l, st in enumerate(stats):
                if st is not None:  # OLU: a block that only passed its output on this step
                    history.add("train", l, st)
        for batch in valid_inputs(cfg, encoder, data, augment):
            _, stats = run_layers(layers, batch, train=False)
            for l, st in enumerate(stats):
                history.add("valid", l, st)
        if cfg.probe and len(data.y_valid):
            from .probe import layer_fisher

            # CFF Fig. 5: class separation of each layer's pooled clean validation features, per epoch
            history.add_fisher(layer_fisher(encoder, data.x_valid, data.y_valid,
                                            autocast_dtype=torch.bfloat16 if cfg.bf16 else None))
        history.end_epoch()
        warn_nonfinite(history, epoch, warned, log)
        if end_of_epoch is not None:
            end_of_epoch(epoch)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix_str(loss_postfix(history))


def loss_postfix(history: History, first_layer: int = 0) -> str:
    """The progress bar's text: each layer's name and its latest training loss, ``L0 0.512 L1
    0.498``; a block that OLU did not train in the last epoch shows the last loss it had, and one
    never trained yet is left out (no placeholders)."""
    parts = []
    for l in range(len(history.names)):
        value = next((v for v in reversed(history.layers[l]["train_loss"]) if v is not None), None)
        if value is not None:
            parts.append(f"L{first_layer + l} {value:.3f}")
    return " ".join(parts)


def warn_nonfinite(history: History, epoch: int, warned: set, log: Callable[[str], None], first_layer: int = 0) -> None:
    """After an epoch: a warning, once per layer, for a non-finite training loss (kept as null in
    the metrics). ``first_layer``: the global index of the history's first layer (a pipeline stage)."""
    for l in range(len(history.names)):
        value = history.last(l, "train_loss")
        if value is not None and not math.isfinite(value) and l not in warned:  # None: not trained this epoch (OLU)
            warned.add(l)
            log(f"warning: layer {first_layer + l} had a non-finite training loss ({value}) in epoch {epoch + 1}"
                " (at least one batch); its epoch mean is recorded as null")


def predict_all(cfg: TrainConfig, encoder, run: "Stage1", data: Dataset, autocast_dtype) -> Dict:
    """Stage 2 of any method on the (selected) trained encoder: accuracies, head info, and the
    trained head module under "_head" (None without one) for the checkpoint."""
    if cfg.method == "bp":
        logits = lambda x: prediction_logits(cfg, encoder, x, head=run.bp_head)  # noqa: E731
        return {**accuracies(cfg, logits, data), "_head": None}
    if cfg.method == "sff" and cfg.ff_predict == "goodness":
        return predict_sff(cfg, encoder, [layer.objective for layer in run.layers], data, autocast_dtype)
    return predict(cfg, encoder, data, autocast_dtype)


def head_features(cfg: TrainConfig, encoder, x: torch.Tensor, autocast_dtype=None) -> torch.Tensor:
    """What the stage-2 linear head reads: the last layer's pooled output (cff, and sff with a
    head: no label input), or for the FF family all layers but the first with the neutral label
    (Hinton 2022). An empty ``x`` (no validation split) gives [0, D]."""
    if not len(x):
        return head_features(cfg, encoder, torch.zeros((1, *x.shape[1:]), device=x.device), autocast_dtype)[:0]
    per_layer = layer_features(encoder, x, autocast_dtype=autocast_dtype)
    if cfg.method in ("cff", "sff"):
        return per_layer[-1]
    return torch.cat(per_layer[1:] if len(per_layer) > 1 else per_layer, 1)


@torch.no_grad()
def prediction_logits(cfg: TrainConfig, encoder, x: torch.Tensor, *, head=None, objectives=None,
                      autocast_dtype=None) -> torch.Tensor:
    """``[N, C]`` scores of a trained model, whose argmax is its prediction: bp's head on the
    encoder, the FF family's goodness of every label, sff's class goodness, or the linear head."""
    if not len(x):  # no validation split: no scores
        return torch.zeros((0, encoder.num_classes), device=x.device)
    if cfg.method == "bp":
        encoder.eval()
        return head(encoder(x)).float()
    chosen = layer_indices(cfg.ff_predict_layers, cfg.layers)
    if cfg.method == "sff" and cfg.ff_predict == "goodness":
        return class_goodness_logits(encoder, objectives, x, autocast_dtype=autocast_dtype, layers=chosen)
    if cfg.method in FF_FAMILY and cfg.ff_predict == "goodness":
        return goodness_logits(encoder, cfg.method, x, backend=cfg.backend, autocast_dtype=autocast_dtype,
                               layers=chosen)
    return head(head_features(cfg, encoder, x, autocast_dtype)).float()


def accuracies(cfg: TrainConfig, logits: Callable[[torch.Tensor], torch.Tensor], data: Dataset) -> Dict:
    """Validation and test accuracy (and top-k) of a scoring function."""
    test_logits = logits(data.x_test)
    return {"valid_accuracy": accuracy(logits(data.x_valid), data.y_valid),
            "test_accuracy": accuracy(test_logits, data.y_test), **topk_results(cfg, test_logits, data.y_test)}


def predict(cfg: TrainConfig, encoder, data: Dataset, autocast_dtype) -> Dict:
    """Stage 2 (cff, or ff family with --ff-predict head): a linear head on the frozen encoder's
    pooled features; otherwise FF's try-every-label rule. Returns accuracies and head info (and
    the head module under "_head")."""
    if cfg.method in FF_FAMILY and cfg.ff_predict == "goodness":
        logits = lambda x: prediction_logits(cfg, encoder, x, autocast_dtype=autocast_dtype)  # noqa: E731
        return {**accuracies(cfg, logits, data), "_head": None,
                "head": {"kind": f"goodness of every label, summed over {_layers_text(cfg)}",
                         "layers": layer_indices(cfg.ff_predict_layers, cfg.layers)}}
    ftr, fva, fte = (head_features(cfg, encoder, x, autocast_dtype) for x in (data.x_train, data.x_valid, data.x_test))
    head, info = train_linear_head(ftr, data.y_train, fva, data.y_valid, data.num_classes, epochs=cfg.head_epochs,
                                   lr=cfg.head_lr, batch_size=cfg.batch_size, seed=cfg.seed)
    with torch.no_grad():
        test_logits = head(fte)
        return {"valid_accuracy": accuracy(head(fva), data.y_valid), "test_accuracy": accuracy(test_logits, data.y_test),
                **topk_results(cfg, test_logits, data.y_test),
                "head": {"kind": "linear (LayerNorm + Linear) on frozen features", **info}, "_head": head}


def predict_sff(cfg: TrainConfig, encoder, objectives, data: Dataset, autocast_dtype) -> Dict:
    """Scalable FF's prediction: the argmax of the blocks' scaled class goodness, averaged over
    the chosen blocks (all by default; one forward pass, no label in the input)."""
    logits = lambda x: prediction_logits(cfg, encoder, x, objectives=objectives, autocast_dtype=autocast_dtype)  # noqa: E731
    return {**accuracies(cfg, logits, data), "_head": None,
            "head": {"kind": f"per-class goodness (scaled), averaged over {_layers_text(cfg, 'blocks')}",
                     "layers": layer_indices(cfg.ff_predict_layers, cfg.layers),
                     "loss_backend": per_class_backend(cfg.backend, data.x_test.device)}}


def per_class_backend(backend: str, device) -> str:
    """The backend that computes sff's per-class goodness (ffkern.per_class's choice: "auto" is
    the fused kernel where the device has one, else the reference)."""
    from ..per_class import _impl

    return _impl(backend, torch.device(device)).name


def _layers_text(cfg: TrainConfig, what: str = "layers") -> str:
    if cfg.ff_predict_layers == "all":
        return f"all {what}"
    return f"{what} {layer_indices(cfg.ff_predict_layers, cfg.layers)} (--ff-predict-layers {cfg.ff_predict_layers})"


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the k highest logits (ties: torch.topk's pick)."""
    if not labels.numel():
        return float("nan")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean().item())


def topk_results(cfg: TrainConfig, test_logits: torch.Tensor, test_labels: torch.Tensor) -> Dict[str, float]:
    """``{"test_top{k}_accuracy": ...}`` when --topk k was asked for, else nothing."""
    if cfg.topk is None:
        return {}
    return {f"test_top{cfg.topk}_accuracy": topk_accuracy(test_logits, test_labels, cfg.topk)}
