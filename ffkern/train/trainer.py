"""The training run behind ``ffkern train``: configuration, stage 1 (layer-local or BP), stage 2
(linear head or FF's try-every-label), evaluation, metrics."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import __version__
from .._backend import resolve
from .._checks import check_choice, check_number
from . import rng
from .bp import train_bp
from .data import Augment, Dataset, batches, check_data_config, dataset_for, input_abs_max, load_dataset  # noqa: F401
from .heads import accuracy, goodness_logits, layer_features, train_linear_head
from .conv_models import CONV_MODELS, NORMS, block_channels, check_depth, default_depth
from .layerwise import LocalLayer, make_local_layers, olu_train_step, run_layers
from .methods import FF_FAMILY, METHODS, LayerBatch, first_batch, make_objective
from .metrics import History, format_table
from .models import MODELS, Encoder, build_encoder
from .schedules import SCHEDULES, margin_schedule

# Defaults per (method, model) that make the plain command the good run on the bundled digits
# (measured on a 2-core CPU, see the README); any explicit option overrides them.
DEFAULTS = {
    ("cff", "mlp"): dict(epochs=30, lr=1e-3, width=500, depth=3),
    ("cff", "vit"): dict(epochs=30, lr=1e-3, width=64, depth=3),
    ("ff", "mlp"): dict(epochs=60, lr=1e-3, width=500, depth=3),
    ("ff", "vit"): dict(epochs=30, lr=3e-3, width=64, depth=3),
    ("symba", "mlp"): dict(epochs=60, lr=1e-3, width=500, depth=3),
    ("symba", "vit"): dict(epochs=30, lr=3e-3, width=64, depth=3),
    ("sffa", "mlp"): dict(epochs=60, lr=1e-3, width=500, depth=3),
    ("sffa", "vit"): dict(epochs=30, lr=3e-3, width=64, depth=3),
    ("bp", "mlp"): dict(epochs=30, lr=1e-3, width=500, depth=3),
    ("bp", "vit"): dict(epochs=30, lr=1e-3, width=64, depth=3),
}
# Conv models (conv_models.py): width is a channel multiplier; depth the number of blocks.
CONV_DEFAULTS = {"cnn": dict(epochs=20, lr=1e-3, width=0.25), "resnet18": dict(epochs=10, lr=1e-3, width=0.25),
                 "mobilenetv3": dict(epochs=10, lr=3e-3, width=0.5)}  # 1e-3: 87 % on digits with seed 1
for _model, _d in CONV_DEFAULTS.items():
    for _method in METHODS:
        DEFAULTS[(_method, _model)] = dict(_d, depth=default_depth(_model))


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
    depth: Optional[int] = None  # L
    heads: int = 4  # H (ViT)
    patch_size: Optional[int] = None  # ViT; None: the image side / 4 (16 patches)
    views: int = 2  # CFF views per batch; 1 = one-forward mode
    temperature: float = 0.15
    schedule: str = "linear"
    m0: float = 0.4
    mL: float = 0.1
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
    valid_fraction: float = 0.1
    bf16: bool = False  # autocast the layers to bfloat16 (GPU only)
    compile: bool = False  # torch.compile every layer
    backend: str = "auto"  # ffkern loss backend
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    olu: bool = False  # overlapping local updates (the Trifecta): a block's loss also trains its predecessor
    norm: str = "batch"  # the cnn's block norm: "batch" (BatchNorm2d, the Trifecta's) or "layer" (LayerNorm([C,H,W]))
    class_scale: float = 1.0  # sff: initial value of each block's learned scale of the class goodness
    channels_last: bool = False  # conv models: weights and maps stored channels-last (NHWC)

    def resolved(self) -> "TrainConfig":
        """Checks every option (ValueError/TypeError naming it) and fills the defaults."""
        check_choice("method", self.method, METHODS)
        check_choice("model", self.model, MODELS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("ff_predict", self.ff_predict, ("goodness", "head"))
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_choice("norm", self.norm, NORMS)
        if self.method == "sff" and self.model not in CONV_MODELS:
            raise ValueError(f"method 'sff' (the per-class conv loss) needs a conv model: --model {', '.join(CONV_MODELS)};"
                             f" got {self.model!r}")
        filled = dataclasses.replace(self, **{k: v for k, v in DEFAULTS[(self.method, self.model)].items() if getattr(self, k) is None})
        conv = filled.model in CONV_MODELS
        if conv:
            check_number("width", filled.width, low=0.0, low_open=True)  # a channel multiplier
            check_depth(filled.model, filled.depth)
        for name in ("epochs", "batch_size", "depth", "heads", "head_epochs", "threads") + (() if conv else ("width",)):
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
        margin_schedule(filled.schedule, filled.depth, filled.m0, filled.mL)  # checks m0 and mL
        p = filled.patch_size
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"patch_size must be an int >= 1, got {p!r}")
        check_number("class_scale", filled.class_scale, low=0.0, low_open=True)
        if filled.olu and filled.method == "bp":
            raise ValueError("olu=True (--olu) is a schedule of local updates; method 'bp' has none (use --method symba,"
                             " ff, sffa, cff or sff)")
        if filled.channels_last and not conv:
            raise ValueError(f"channels_last=True (--channels-last) is a memory layout of the conv models' maps; model"
                             f" {filled.model!r} has none")
        if filled.norm != "batch" and filled.model != "cnn":
            raise ValueError(f"norm={filled.norm!r} (--norm) chooses the cnn's block norm; model {filled.model!r} has its own")
        if filled.model == "vit" and filled.width % filled.heads:  # attention splits E into H equal heads
            raise ValueError(f"width (--width) E={filled.width} must be divisible by heads (--heads) H={filled.heads} for the ViT")
        return check_data_config(filled)  # data, augmentation and protocol options (data.py)


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
        odd = [l for l, c in enumerate(block_channels(cfg.model, cfg.width, cfg.depth)) if c % 2]
        if odd:
            raise ValueError(f"method 'sffa' splits each block's channels into two halves, but with width (--width)"
                             f" {cfg.width} block(s) {odd} of model {cfg.model!r} have an odd number of channels")
    if cfg.method == "sff" and cfg.backend not in ("auto", "reference"):
        raise ValueError(f"method 'sff': the per-class goodness loss has no {cfg.backend!r} kernel yet (only the"
                         f" reference); use --backend auto or reference")
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


def _progress(epochs: int, desc: str, enabled: bool):
    if not enabled:
        return range(epochs)
    from tqdm.auto import tqdm

    return tqdm(range(epochs), desc=desc, unit="epoch", dynamic_ncols=True)


def default_patch(sample_shape) -> int:
    """ViT patch side by default: a 4 x 4 grid of patches (16 tokens; 2x2 pixels on the digits)."""
    if len(sample_shape) != 3:
        raise ValueError("model 'vit' needs image inputs [N, C, H, W]; this dataset holds vectors")
    return max(1, sample_shape[-1] // 4)


def build_model(cfg: TrainConfig, data: Dataset) -> Encoder:
    """The encoder of a (resolved) config, on the data's device. Deterministic in cfg.seed, layer by
    layer (rng.INIT streams), so every process of a pipeline can build it and keep its own layers."""
    patch = (cfg.patch_size or default_patch(data.sample_shape)) if cfg.model == "vit" else 1
    label_scale = input_abs_max(data.x_train) if cfg.method in FF_FAMILY else 1.0  # FF's label: a bright "pixel"
    encoder = build_encoder(cfg.model, data.sample_shape, data.num_classes, width=cfg.width, depth=cfg.depth,
                            heads=cfg.heads, patch_size=patch, label_input=cfg.method in FF_FAMILY,
                            label_scale=label_scale, seed=cfg.seed, norm=cfg.norm)
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
        return [None] * cfg.depth
    return margin_schedule(cfg.schedule, cfg.depth, cfg.m0, cfg.mL)


def build_local_layers(cfg: TrainConfig, encoder: Encoder, indices: Optional[Sequence[int]] = None) -> List[LocalLayer]:
    """LocalLayers (own AdamW, own objective) for the contiguous layer indices ``indices`` (default:
    all): a pipeline stage builds only its group."""
    indices = list(range(cfg.depth)) if indices is None else list(indices)
    if not indices or indices != list(range(indices[0], indices[0] + len(indices))) or not 0 <= indices[0] <= indices[-1] < cfg.depth:
        raise ValueError(f"indices must be a non-empty contiguous range inside 0..{cfg.depth - 1}, got {indices}")
    margins = layer_margins(cfg)
    objectives = [make_objective(cfg.method, encoder, margins[l], temperature=cfg.temperature, threshold=cfg.threshold,
                                 alpha=cfg.alpha, backend=cfg.backend, layer=l, seed=cfg.seed,
                                 class_scale=cfg.class_scale) for l in indices]
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
          data: Optional[Dataset] = None) -> Dict:
    """Runs one training and returns the metrics dict (see README: Training)."""
    cfg = config.resolved()
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    apply_device_options(cfg, device)
    autocast_dtype = torch.bfloat16 if cfg.bf16 else None
    backend_name = resolve(cfg.backend, device).name
    data = dataset_for(cfg, data).to(device)  # loaded unless given, with the protocol (label noise, fraction)
    check_compatible(cfg, data)
    log(f"ffkern train: {cfg.method} on {cfg.model} | {data.summary()} | device {device}, loss backend {backend_name}")
    notes = dataset_warnings(data)
    for note in notes:
        log(f"warning: {note}")
    encoder = build_model(cfg, data)
    augment = build_augment(cfg, data)
    bar = _progress(cfg.epochs, f"{cfg.method}/{cfg.model}", progress)

    result: Dict = {}
    if cfg.method == "bp":
        history = History(["end-to-end"])
        head = train_bp(encoder, data, history, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        weight_decay=cfg.weight_decay, augment=augment, seed=cfg.seed, epoch_bar=bar,
                        autocast_dtype=autocast_dtype)
        with torch.no_grad():
            encoder.eval()
            result["valid_accuracy"] = accuracy(head(encoder(data.x_valid)).float(), data.y_valid)
            test_logits = head(encoder(data.x_test)).float()
            result["test_accuracy"] = accuracy(test_logits, data.y_test)
            result.update(topk_results(cfg, test_logits, data.y_test))
    else:
        layers = build_local_layers(cfg, encoder)
        history = History([f"layer {l}" for l in range(cfg.depth)], layer_margins(cfg))
        stage1(cfg, encoder, layers, data, augment, history, bar, log)
        if cfg.method == "sff" and cfg.ff_predict == "goodness":
            result.update(predict_sff(cfg, encoder, [layer.objective for layer in layers], data, autocast_dtype))
        else:
            result.update(predict(cfg, encoder, data, autocast_dtype))

    metrics = run_metrics(cfg, data, encoder, augment, history, result, backend_name, device, t0, log)
    metrics["warnings"] = notes
    return metrics


def check_device_options(cfg: TrainConfig, device: torch.device) -> None:
    """The options that depend on the device (ValueError naming the option)."""
    if cfg.bf16 and device.type != "cuda":
        raise ValueError("bf16=True (--bf16) autocasts on a GPU; on the CPU it is not offered (use --device cuda)")


def apply_device_options(cfg: TrainConfig, device: torch.device) -> None:
    """Checks the options that depend on the device and sets torch's CPU threads."""
    check_device_options(cfg, device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)


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
        "config": dataclasses.asdict(cfg) | {"patch_size": patch, "shift": augment.shift} | augment.describe(),
        "protocol": {"label_noise": 0.0, "train_fraction": 1.0, "num_train_full": len(data.y_train),
                     "num_train": len(data.y_train), "noisy_train_labels": 0} | data.protocol,
        "versions": {"ffkern": __version__, "torch": torch.__version__},
    }


def stage1(cfg: TrainConfig, encoder, layers, data: Dataset, augment: Augment, history: History, bar,
           log: Callable[[str], None] = print) -> None:
    """Layer-local epochs: every batch goes through the layers in order, each layer updating at once."""
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
        history.end_epoch()
        warn_nonfinite(history, epoch, warned, log)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=" ".join(_loss_text(history.last(l, "train_loss")) for l in range(len(layers))))


def _loss_text(value) -> str:
    return "-" if value is None else f"{value:.3f}"  # None: a block OLU did not train in this epoch


def warn_nonfinite(history: History, epoch: int, warned: set, log: Callable[[str], None], first_layer: int = 0) -> None:
    """After an epoch: a warning, once per layer, for a non-finite training loss (kept as null in
    the metrics). ``first_layer``: the global index of the history's first layer (a pipeline stage)."""
    for l in range(len(history.names)):
        value = history.last(l, "train_loss")
        if value is not None and not math.isfinite(value) and l not in warned:  # None: not trained this epoch (OLU)
            warned.add(l)
            log(f"warning: layer {first_layer + l} had a non-finite training loss ({value}) in epoch {epoch + 1}"
                " (at least one batch); its epoch mean is recorded as null")


def predict(cfg: TrainConfig, encoder, data: Dataset, autocast_dtype) -> Dict:
    """Stage 2 (cff, or ff family with --ff-predict head): a linear head on the frozen encoder's
    pooled features; otherwise FF's try-every-label rule. Returns accuracies and head info."""
    if cfg.method in FF_FAMILY and cfg.ff_predict == "goodness":
        opts = dict(backend=cfg.backend, autocast_dtype=autocast_dtype)
        test_logits = goodness_logits(encoder, cfg.method, data.x_test, **opts)
        return {"valid_accuracy": accuracy(goodness_logits(encoder, cfg.method, data.x_valid, **opts), data.y_valid),
                "test_accuracy": accuracy(test_logits, data.y_test), **topk_results(cfg, test_logits, data.y_test),
                "head": {"kind": "goodness of every label, summed over layers"}}

    def feats(x):
        per_layer = layer_features(encoder, x, autocast_dtype=autocast_dtype)
        if cfg.method in ("cff", "sff"):  # sff with --ff-predict head: no label input, as cff
            return per_layer[-1]
        # FF family with a head (Hinton 2022): all layers but the first, neutral label.
        return torch.cat(per_layer[1:] if len(per_layer) > 1 else per_layer, 1)

    ftr, fva, fte = feats(data.x_train), feats(data.x_valid), feats(data.x_test)
    head, info = train_linear_head(ftr, data.y_train, fva, data.y_valid, data.num_classes, epochs=cfg.head_epochs,
                                   lr=cfg.head_lr, batch_size=cfg.batch_size, seed=cfg.seed)
    with torch.no_grad():
        test_logits = head(fte)
        return {"valid_accuracy": accuracy(head(fva), data.y_valid), "test_accuracy": accuracy(test_logits, data.y_test),
                **topk_results(cfg, test_logits, data.y_test),
                "head": {"kind": "linear (LayerNorm + Linear) on frozen features", **info}}


def predict_sff(cfg: TrainConfig, encoder, objectives, data: Dataset, autocast_dtype) -> Dict:
    """Scalable FF's prediction: the argmax of the blocks' scaled class goodness, averaged over
    all blocks (one forward pass, no label in the input)."""
    from .heads import class_goodness_logits

    def logits(x):
        return class_goodness_logits(encoder, objectives, x, autocast_dtype=autocast_dtype)

    test_logits = logits(data.x_test)
    return {"valid_accuracy": accuracy(logits(data.x_valid), data.y_valid),
            "test_accuracy": accuracy(test_logits, data.y_test), **topk_results(cfg, test_logits, data.y_test),
            "head": {"kind": "per-class goodness (scaled), averaged over all blocks",
                     "loss_backend": "reference"}}  # no other backend has the per-class kernel yet


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
