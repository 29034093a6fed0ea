"""Data: the bundled digits set, user ``.npz`` files, the standard dataset files (datasets.py),
seeded splits, the label-noise / limited-data protocol, batches; the augmentations are in augment.py.

Everything is held whole on the training device, so batches are index selections, with no
DataLoader workers. Images read from 8-bit files stay 8-bit there (``ImageStore``: CIFAR-10 is
150 MB, not the 600 MB of float32) and are standardized per batch, when a batch is indexed.
"""
from __future__ import annotations

import os
import zipfile
import zlib
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .._checks import check_number
from . import rng
from .augment import Augment, make_views, parse_randaug  # noqa: F401  (Augment and make_views lived here)


class DatasetError(ValueError):
    """A dataset file that cannot be used: unreadable, not a .npz, or arrays of the wrong kind.
    The message starts with the file's path."""


class MissingDependency(ImportError):
    """An optional package a dataset format needs (scipy for SVHN, Pillow for image folders)."""


class ImageStore:
    """8-bit images ``[N, C, H, W]`` kept as uint8 (on the training device), read as standardized
    float32: ``store[idx]`` converts only the selected rows, ``(pixel / 255 - mean) / std`` per
    channel. It stands where a float tensor stood (``Dataset.x_train``): shape, len, device,
    dim(), indexing and .to() behave like the tensor's; anything else (a torch function, another
    tensor method) is applied to the whole converted tensor, which costs its float32 memory.
    """

    def __init__(self, raw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        if raw.dtype != torch.uint8 or raw.dim() != 4:
            raise ValueError(f"ImageStore holds uint8 images [N, C, H, W], got {raw.dtype} {list(raw.shape)}")
        self.raw = raw
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        # (raw / 255 - mean) / std = raw * scale + offset: two in-place passes over a fresh float
        # batch. Shaped [C, 1, 1], they broadcast over a batch [B, C, H, W] and over one image.
        self._scale = (1.0 / (255.0 * self.std)).reshape(-1, 1, 1).to(raw.device)
        self._offset = (-self.mean / self.std).reshape(-1, 1, 1).to(raw.device)

    shape = property(lambda self: self.raw.shape)
    device = property(lambda self: self.raw.device)
    dtype = property(lambda self: torch.float32)  # what indexing gives
    ndim = property(lambda self: 4)

    def dim(self) -> int:
        return 4

    def size(self, dim: Optional[int] = None):
        return self.raw.size() if dim is None else self.raw.size(dim)

    def numel(self) -> int:
        return self.raw.numel()

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, tuple):  # indexing beyond the rows (e.g. a channel): on the converted whole
            return self.materialize()[idx]
        return self.raw[idx].to(torch.float32).mul_(self._scale).add_(self._offset)

    def take(self, idx) -> "ImageStore":
        """The rows ``idx`` as another ImageStore (still uint8, same statistics)."""
        return ImageStore(self.raw[idx], self.mean, self.std)

    def to(self, device) -> "ImageStore":
        return ImageStore(self.raw.to(device), self.mean, self.std)

    def materialize(self) -> torch.Tensor:
        return self[:]

    def abs_max(self) -> float:
        """max |standardized value| over the store, from the per-channel extremes (no float copy)."""
        if not len(self.raw):
            return 0.0
        scale, offset = self._scale.reshape(-1), self._offset.reshape(-1)
        lo = self.raw.amin((0, 2, 3)).float() * scale + offset
        hi = self.raw.amax((0, 2, 3)).float() * scale + offset
        return float(torch.maximum(lo.abs(), hi.abs()).max())

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def conv(a):
            if isinstance(a, ImageStore):
                return a.materialize()
            if isinstance(a, (list, tuple)):
                return type(a)(conv(v) for v in a)
            return a
        return func(*conv(tuple(args)), **{k: conv(v) for k, v in (kwargs or {}).items()})

    def __array__(self, dtype=None, copy=None):
        out = self.materialize().cpu().numpy()
        return out if dtype is None else out.astype(dtype)

    def __getattr__(self, name):
        if name.startswith("_"):  # copy/pickle probes and our own attributes: never a whole conversion
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __repr__(self) -> str:
        return f"ImageStore(uint8 {list(self.raw.shape)} on {self.raw.device}, standardized per channel)"


def input_abs_max(x) -> float:
    """max |x| of a split's inputs (a tensor or an ImageStore, the latter without a float copy)."""
    return x.abs_max() if isinstance(x, ImageStore) else float(x.abs().max())


@dataclass
class Dataset:
    """Standardized inputs (images ``[N, C, H, W]`` or vectors ``[N, D]``: float32 tensors, or
    ``ImageStore`` s of uint8 that index to float32), int64 labels.

    ``pixel_mean``/``pixel_std`` (per channel, for pixel values in [0, 1]; None when the scale of
    the values is unknown, as for a float .npz) let augmentations work on pixels: black padding,
    RandAugment's colour ops. ``protocol`` records what apply_protocol did (label noise, fraction)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    pixel_mean: Optional[torch.Tensor] = None
    pixel_std: Optional[torch.Tensor] = None
    protocol: Dict = field(default_factory=dict)

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x_train.dim() == 4

    def to(self, device) -> "Dataset":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if isinstance(value, (torch.Tensor, ImageStore)) and not key.startswith("pixel_"):
                moved[key] = value.to(device)
        return Dataset(**moved)

    def summary(self) -> str:
        stored = ", stored uint8" if isinstance(self.x_train, ImageStore) else ""
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_valid)} valid / {len(self.y_test)} test,"
                f" {self.num_classes} classes, sample shape {list(self.sample_shape)}{stored}")


def _split_indices(labels: np.ndarray, fraction: float, seed: int, key: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified split: about ``fraction`` of every class goes to the second part (seeded)."""
    gen = np.random.default_rng(rng.stream_seed(seed, key))
    first, second = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        gen.shuffle(idx)
        k = int(round(fraction * len(idx)))
        second.append(idx[:k])
        first.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def _standardize(train: np.ndarray, *others: np.ndarray):
    """Zero mean, unit variance with statistics of the training part only: per channel for
    images [N, C, H, W], one scalar for vectors (so constant pixels do not divide by ~0)."""
    axes = (0, 2, 3) if train.ndim == 4 else None
    mean = train.mean(axis=axes, keepdims=axes is not None)
    std = train.std(axis=axes, keepdims=axes is not None) + 1e-6
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def _make(name, x_train, y_train, x_test, y_test, num_classes, seed, valid_fraction, pixels=False) -> Dataset:
    """float inputs; ``pixels``: the values are pixels in [0, 1], so the statistics of the
    standardization are recorded for the augmentations (digits)."""
    keep, valid = _split_indices(y_train, valid_fraction, seed, 1)
    if len(valid) == 0:
        raise DatasetError(_empty_valid_message(name, y_train, valid_fraction))
    xt, xv, xs = _standardize(x_train[keep], x_train[valid], x_test)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    stats = {}
    if pixels and x_train.ndim == 4:  # the same numbers _standardize used
        part = x_train[keep]
        stats = dict(pixel_mean=t(part.mean(axis=(0, 2, 3)).astype(np.float32)),
                     pixel_std=t((part.std(axis=(0, 2, 3)) + 1e-6).astype(np.float32)))
    return Dataset(name, t(xt), t(y_train[keep].astype(np.int64)), t(xv), t(y_train[valid].astype(np.int64)),
                   t(xs), t(y_test.astype(np.int64)), int(num_classes), **stats)


def _uint8_stats(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images [N, C, H, W] as pixels in [0, 1], exactly, from
    one 256-bin histogram per channel (no float copy of the images)."""
    values = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = np.bincount(x[:, c].reshape(-1), minlength=256).astype(np.float64)
        m = (counts * values).sum() / counts.sum()
        mean.append(m / 255.0)
        std.append(np.sqrt((counts * (values - m) ** 2).sum() / counts.sum()) / 255.0 + 1e-6)
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def make_uint8_dataset(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                       num_classes: int, seed: int = 0, valid_fraction: float = 0.1) -> Dataset:
    """A Dataset of uint8 images [N, C, H, W] (kept 8-bit: ImageStore) and labels 0..C-1: the seeded
    stratified validation split, per-channel statistics of the training part."""
    if x_train.dtype != np.uint8 or x_test.dtype != np.uint8 or x_train.ndim != 4 or x_test.ndim != 4:
        raise ValueError(f"{name}: uint8 images [N, C, H, W] expected, got {x_train.dtype} {x_train.shape}"
                         f" and {x_test.dtype} {x_test.shape}")
    keep, valid = _split_indices(y_train, valid_fraction, seed, 1)
    if len(valid) == 0:
        raise DatasetError(_empty_valid_message(name, y_train, valid_fraction))
    xt = x_train[keep]
    mean, std = _uint8_stats(xt)
    # C order and writable: np.frombuffer's arrays (IDX) are read-only, which torch warns about
    t = lambda a: torch.from_numpy(np.require(a, requirements=["C", "W"]))  # noqa: E731
    store = lambda a: ImageStore(t(a), t(mean), t(std))  # noqa: E731
    return Dataset(name, store(xt), t(y_train[keep].astype(np.int64)), store(x_train[valid]),
                   t(y_train[valid].astype(np.int64)), store(x_test), t(y_test.astype(np.int64)), int(num_classes),
                   pixel_mean=t(mean), pixel_std=t(std))


def _empty_valid_message(name: str, y_train: np.ndarray, fraction: float) -> str:
    """The split is stratified: a class gives round(fraction * its samples) to validation, so a
    class of m samples gives one only when fraction * m > 0.5."""
    largest = int(np.unique(y_train, return_counts=True)[1].max()) if len(y_train) else 0
    need = "more than 0 samples" if fraction <= 0 else f"at least {int(0.5 / fraction) + 1} samples of one class"
    return (f"{name}: too few training samples for the validation split: {len(y_train)} samples, at most {largest}"
            f" per class, and validation takes {fraction:g} of each class (rounded), which is none; it needs {need}")


def load_digits(seed: int = 0, valid_fraction: float = 0.1, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled handwritten digits (1797 images 8x8, 10 classes; no download),
    split into test (``test_fraction``) and train, then valid (``valid_fraction`` of train)."""
    valid_fraction = check_number("valid_fraction", valid_fraction, low=0.0, high=0.5)
    test_fraction = check_number("test_fraction", test_fraction, low=0.0, high=0.9, low_open=True)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn (or ffkern[train])") from exc
    bunch = sk_load_digits()
    x = (bunch.images[:, None, :, :] / 16.0).astype(np.float32)  # [N, 1, 8, 8], pixel values 0..16
    y = bunch.target.astype(np.int64)
    train, test = _split_indices(y, test_fraction, seed, 0)
    return _make("digits", x[train], y[train], x[test], y[test], 10, seed, valid_fraction, pixels=True)


def _npz_inputs(name: str, a: np.ndarray, path: str) -> np.ndarray:
    """Inputs as float32 (uint8 images: as pixels in [0, 1]), images channels-first."""
    if a.dtype.kind not in "uif":
        raise DatasetError(f"{path}: {name} must hold numbers, got dtype {a.dtype}")
    x = _npz_layout(name, a, path).astype(np.float32)
    if a.dtype == np.uint8:
        x /= 255.0  # 8-bit images
    if not np.isfinite(x).all():
        raise DatasetError(f"{path}: {name} contains NaN or infinite values")
    return x


def _npz_layout(name: str, x: np.ndarray, path: str) -> np.ndarray:
    """[N, H, W] -> [N, 1, H, W], channels-last [N, H, W, C] -> [N, C, H, W]; vectors as they are."""
    if x.ndim == 3:  # [N, H, W]: one channel
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # channels-last [N, H, W, C], as CIFAR arrays usually come
    elif x.ndim not in (2, 4):
        raise DatasetError(f"{path}: {name} must be images [N, C, H, W] / [N, H, W] or vectors [N, D], got shape {x.shape}")
    return x


def _npz_labels(name: str, a: np.ndarray, n: int, path: str) -> np.ndarray:
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise DatasetError(f"{path}: {name} must be a 1-D integer array, got dtype {a.dtype} and shape {a.shape}")
    if len(a) != n:
        raise DatasetError(f"{path}: {name} has {len(a)} labels but the inputs have {n} samples")
    if a.dtype.kind == "u" and len(a) and a.max() > np.iinfo(np.int64).max:
        raise DatasetError(f"{path}: {name} has labels above 2**63 - 1; labels must fit in int64")
    return a.astype(np.int64)


def remap_labels(y_train: np.ndarray, y_test: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of any integer values (sparse ids like 2**40, negative ones like -1/1) become class
    indices 0..C-1, in increasing order of value (np.unique), over train and test together so
    that a value means the same class in both. Labels that already are 0..C-1 with every class
    present stay as they are. The models size their heads and label embeddings by C, so the
    values themselves must never be used as indices. Returns (train, test, values: index -> label)."""
    values, inverse = np.unique(np.concatenate([y_train, y_test]), return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    return inverse[:len(y_train)], inverse[len(y_train):], values


_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a .npz is a zip archive (an empty one starts with the second)
# What reading a damaged archive raises: truncated or corrupt zip (BadZipFile, EOFError, zlib.error
# for savez_compressed), a bad .npy header or an object array, refused without pickles (ValueError).
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def _check_npz_file(path: str) -> None:
    """Refuses what is not a .npz archive by its first bytes, before numpy sees it: np.load would
    take any other file for a pickle ("contains pickled (object) data"), which is misleading."""
    if os.path.isdir(path):
        raise DatasetError(f"{path}: is a folder, not a .npz file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if not head:
        raise DatasetError(f"{path}: the file is empty; a dataset .npz holds x_train, y_train, x_test, y_test")
    if head == b"\x93NUMPY":
        raise DatasetError(f"{path}: is a single .npy array, not a .npz archive with x_train, y_train, x_test, y_test"
                           " (write one with numpy.savez)")
    if head[:4] not in _ZIP_MAGIC:
        raise DatasetError(f"{path}: is not a .npz archive (numpy.savez writes a zip file; this one starts with {head[:4]!r})")


def _read_npz(path: str) -> Dict[str, np.ndarray]:
    """The four arrays of a dataset .npz, never unpickling anything (allow_pickle=False); every
    failure to read becomes a DatasetError naming the file (and the array)."""
    _check_npz_file(path)
    try:
        z = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise DatasetError(f"{path}: not a readable .npz archive (truncated or damaged?): {exc}") from None
    with z:
        missing = [k for k in _NPZ_ARRAYS if k not in z.files]
        if missing:
            raise DatasetError(f"{path}: missing arrays {missing}; a dataset .npz needs x_train, y_train, x_test, y_test (has {z.files})")
        arrays = {}
        for key in _NPZ_ARRAYS:
            try:
                arrays[key] = z[key]
            except _READ_ERRORS as exc:
                raise DatasetError(f"{path}: array {key} cannot be read (truncated, damaged, or an object array,"
                                   f" which ffkern never unpickles): {exc}") from None
    return arrays


def load_npz(path: str, seed: int = 0, valid_fraction: float = 0.1) -> Dataset:
    """A ``.npz`` with arrays x_train, y_train, x_test, y_test (e.g. CIFAR-10 brought by the user);
    ``valid_fraction`` of the training part becomes the validation split. Labels may be any
    integers: they are mapped to 0..C-1 (``remap_labels``). A file that cannot be used raises
    DatasetError (a ValueError) naming it; a missing one FileNotFoundError."""
    valid_fraction = check_number("valid_fraction", valid_fraction, low=0.0, high=0.5)
    z = _read_npz(path)
    # 8-bit images (both splits) stay 8-bit on the device: a CIFAR-10 .npz is 150 MB, not 600 MB
    images8 = all(z[k].dtype == np.uint8 and z[k].ndim in (3, 4) for k in ("x_train", "x_test"))
    if images8:
        x_train, x_test = (_npz_layout(k, z[k], path) for k in ("x_train", "x_test"))
    else:
        x_train = _npz_inputs("x_train", z["x_train"], path)
        x_test = _npz_inputs("x_test", z["x_test"], path)
    y_train = _npz_labels("y_train", z["y_train"], len(x_train), path)
    y_test = _npz_labels("y_test", z["y_test"], len(x_test), path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"{path}: x_train samples are {x_train.shape[1:]} but x_test samples are {x_test.shape[1:]}")
    if len(x_train) < 2 or len(x_test) < 1:
        raise DatasetError(f"{path}: needs at least 2 training and 1 test samples")
    y_train, y_test, values = remap_labels(y_train, y_test)
    if images8:
        return make_uint8_dataset(os.path.basename(path), x_train, y_train, x_test, y_test, len(values), seed,
                                  valid_fraction)
    return _make(os.path.basename(path), x_train, y_train, x_test, y_test, len(values), seed, valid_fraction)


# Named datasets read from the publishers' files in --data-dir (datasets.py).
NAMED_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "folder")


def load_dataset(spec: str, seed: int = 0, valid_fraction: float = 0.1, data_dir: Optional[str] = None) -> Dataset:
    """``"digits"``, the path of a ``.npz`` file, or a name of NAMED_DATASETS with ``data_dir``, the
    folder that holds that dataset's files as published (see datasets.py and the README)."""
    if not isinstance(spec, str):
        raise TypeError(f"dataset must be 'digits', a path to a .npz file or one of {list(NAMED_DATASETS)},"
                        f" got {type(spec).__name__}")
    if spec in NAMED_DATASETS:
        if data_dir is None:
            raise ValueError(f"dataset {spec!r} is read from its published files: give the folder that holds them"
                             " (--data-dir DIR, data_dir=...)")
        from . import datasets

        valid_fraction = check_number("valid_fraction", valid_fraction, low=0.0, high=0.5)
        return datasets.load_named(spec, data_dir, seed=seed, valid_fraction=valid_fraction)
    if data_dir is not None:
        raise ValueError(f"data_dir (--data-dir) is for the named datasets {list(NAMED_DATASETS)}; dataset {spec!r}"
                         " does not read it")
    if spec == "digits":
        return load_digits(seed, valid_fraction)
    if spec.endswith(".npz"):
        return load_npz(spec, seed, valid_fraction)
    raise ValueError(f"dataset must be 'digits', a path ending in .npz, or one of {list(NAMED_DATASETS)} (with a data"
                     f" folder), got {spec!r}")


# ---------------------------------------------------------------- protocol: limited data, label noise
_FRACTION_KEY, _NOISE_KEY = 101, 102  # stream keys of the subset and the noise (the splits use 0 and 1)


def _rows(x, idx: torch.Tensor):
    return x.take(idx) if isinstance(x, ImageStore) else x[idx.to(x.device)]


def apply_protocol(data: Dataset, *, seed: int, label_noise: float = 0.0, train_fraction: float = 1.0) -> Dataset:
    """CFF's Table 4 settings, on the training split only (validation and test stay as they are):
    ``train_fraction`` keeps a seeded stratified subset (round(F * count) of each class, at least
    one), then ``label_noise`` gives exactly round(P * n) seeded samples a uniformly random other
    class (symmetric noise). Idempotent: a dataset that already carries this protocol is returned
    as it is (the CLI applies it once, before training starts)."""
    label_noise = check_number("label_noise", label_noise, low=0.0, high=1.0)
    train_fraction = check_number("train_fraction", train_fraction, low=0.0, high=1.0, low_open=True)
    wanted = {"label_noise": label_noise, "train_fraction": train_fraction}
    done = {k: data.protocol[k] for k in wanted if k in data.protocol}
    if done:
        if done == wanted:
            return data
        raise ValueError(f"dataset {data.name} already has the protocol {done} applied; asked for {wanted}")
    if label_noise == 0.0 and train_fraction == 1.0:
        return data
    x, y = data.x_train, data.y_train
    labels = y.cpu().numpy()
    record = dict(wanted, num_train_full=len(labels))
    if train_fraction < 1.0:
        gen = np.random.default_rng(rng.stream_seed(seed, _FRACTION_KEY))
        kept = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            gen.shuffle(idx)
            kept.append(idx[:max(1, int(round(train_fraction * len(idx))))])
        keep = torch.from_numpy(np.sort(np.concatenate(kept)))
        x, labels = _rows(x, keep), labels[keep.numpy()]
    noisy = np.zeros(len(labels), bool)
    if label_noise > 0.0:
        if data.num_classes < 2:
            raise ValueError(f"label_noise (--label-noise) needs at least 2 classes, dataset {data.name} has {data.num_classes}")
        gen = np.random.default_rng(rng.stream_seed(seed, _NOISE_KEY))
        chosen = gen.permutation(len(labels))[:int(round(label_noise * len(labels)))]
        labels = labels.copy()
        # a uniformly random class other than the true one: true + 1..C-1 (mod C)
        labels[chosen] = (labels[chosen] + gen.integers(1, data.num_classes, len(chosen))) % data.num_classes
        noisy[chosen] = True
    record.update(num_train=len(labels), noisy_train_labels=int(noisy.sum()))
    return dataclasses.replace(data, x_train=x, y_train=torch.from_numpy(labels.astype(np.int64)).to(y.device),
                               protocol=record)


def check_data_config(cfg):
    """Checks and fills a TrainConfig's data, augmentation and protocol options (ValueError naming
    the option) and returns the config: ``shift`` is the older name of ``crop_pad`` (both are
    set to the one given), ``randaug`` becomes an (N, M) pair."""
    crop, shift = cfg.crop_pad, cfg.shift
    if crop is not None and shift is not None and crop != shift:
        raise ValueError(f"crop_pad (--crop-pad) {crop} and its older name shift (--shift) {shift} disagree; give one")
    crop = crop if crop is not None else shift
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 0):
        raise ValueError(f"crop_pad (--crop-pad) must be an int >= 0, got {crop!r}")
    if cfg.flip is not None and not isinstance(cfg.flip, bool):
        raise ValueError(f"flip (--flip/--no-flip) must be True, False or None (by the data), got {cfg.flip!r}")
    check_number("rotate (--rotate)", cfg.rotate, low=0.0, high=180.0)
    try:
        randaug = parse_randaug(cfg.randaug)
    except ValueError as exc:
        raise ValueError(f"--randaug: {exc}") from None
    check_number("label_noise (--label-noise)", cfg.label_noise, low=0.0, high=1.0)
    check_number("train_fraction (--train-fraction)", cfg.train_fraction, low=0.0, high=1.0, low_open=True)
    k = cfg.topk
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"topk (--topk) must be an int >= 1, got {k!r}")
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir (--data-dir) must be a path, got {type(cfg.data_dir).__name__}")
    if cfg.data_dir is not None and cfg.dataset not in NAMED_DATASETS:
        raise ValueError(f"data_dir (--data-dir) is for the named datasets {list(NAMED_DATASETS)}, not for"
                         f" dataset {cfg.dataset!r}")
    if cfg.data_dir is None and cfg.dataset in NAMED_DATASETS:
        raise ValueError(f"dataset {cfg.dataset!r} (--dataset) is read from its published files: give their folder"
                         " with --data-dir DIR")
    data_dir = os.fspath(cfg.data_dir) if cfg.data_dir is not None else None
    return dataclasses.replace(cfg, crop_pad=crop, shift=crop, randaug=randaug, data_dir=data_dir)


def dataset_for(cfg, data: Optional[Dataset] = None) -> Dataset:
    """The dataset of a resolved TrainConfig: ``data`` if given (else loaded from cfg.dataset /
    cfg.data_dir), with the config's protocol applied, checked against --topk."""
    if data is None:
        data = load_dataset(cfg.dataset, cfg.seed, cfg.valid_fraction, data_dir=cfg.data_dir)
    data = apply_protocol(data, seed=cfg.seed, label_noise=cfg.label_noise, train_fraction=cfg.train_fraction)
    if cfg.topk is not None and cfg.topk > data.num_classes:
        raise ValueError(f"topk (--topk) {cfg.topk} is more than the {data.num_classes} classes of dataset {data.name}")
    return data


def batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index batches of one epoch, shuffled by the (seed, epoch) stream; the last may be smaller."""
    order = torch.randperm(n, generator=rng.generator(seed, rng.SHUFFLE, epoch)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]
