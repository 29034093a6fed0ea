"""Data: the bundled digits set, user ``.npz`` files, seeded splits, batches and two-view augmentations.

Everything is a tensor held whole on the training device (digits is 1797 8x8 images; CIFAR-10 as
float32 is 600 MB), so batches are index selections, with no DataLoader workers.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, fields
from typing import Dict, Iterator, Tuple

import numpy as np
import torch

from .._checks import check_number
from . import rng


class DatasetError(ValueError):
    """A dataset file that cannot be used: unreadable, not a .npz, or arrays of the wrong kind.
    The message starts with the file's path."""


@dataclass
class Dataset:
    """Standardized float32 inputs (images ``[N, C, H, W]`` or vectors ``[N, D]``), int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x_train.dim() == 4

    def to(self, device) -> "Dataset":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[key] = value.to(device)
        return Dataset(**moved)

    def summary(self) -> str:
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_valid)} valid / {len(self.y_test)} test,"
                f" {self.num_classes} classes, sample shape {list(self.sample_shape)}")


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


def _make(name, x_train, y_train, x_test, y_test, num_classes, seed, valid_fraction) -> Dataset:
    keep, valid = _split_indices(y_train, valid_fraction, seed, 1)
    if len(valid) == 0:
        raise DatasetError(_empty_valid_message(name, y_train, valid_fraction))
    xt, xv, xs = _standardize(x_train[keep], x_train[valid], x_test)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Dataset(name, t(xt), t(y_train[keep].astype(np.int64)), t(xv), t(y_train[valid].astype(np.int64)),
                   t(xs), t(y_test.astype(np.int64)), int(num_classes))


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
    return _make("digits", x[train], y[train], x[test], y[test], 10, seed, valid_fraction)


def _npz_inputs(name: str, a: np.ndarray, path: str) -> np.ndarray:
    if a.dtype.kind not in "uif":
        raise DatasetError(f"{path}: {name} must hold numbers, got dtype {a.dtype}")
    x = a.astype(np.float32)
    if a.dtype == np.uint8:
        x /= 255.0  # 8-bit images
    if x.ndim == 3:  # [N, H, W]: one channel
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # channels-last [N, H, W, C], as CIFAR arrays usually come
    elif x.ndim not in (2, 4):
        raise DatasetError(f"{path}: {name} must be images [N, C, H, W] / [N, H, W] or vectors [N, D], got shape {a.shape}")
    if not np.isfinite(x).all():
        raise DatasetError(f"{path}: {name} contains NaN or infinite values")
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
    x_train = _npz_inputs("x_train", z["x_train"], path)
    x_test = _npz_inputs("x_test", z["x_test"], path)
    y_train = _npz_labels("y_train", z["y_train"], len(x_train), path)
    y_test = _npz_labels("y_test", z["y_test"], len(x_test), path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"{path}: x_train samples are {x_train.shape[1:]} but x_test samples are {x_test.shape[1:]}")
    if len(x_train) < 2 or len(x_test) < 1:
        raise DatasetError(f"{path}: needs at least 2 training and 1 test samples")
    y_train, y_test, values = remap_labels(y_train, y_test)
    return _make(os.path.basename(path), x_train, y_train, x_test, y_test, len(values), seed, valid_fraction)


def load_dataset(spec: str, seed: int = 0, valid_fraction: float = 0.1) -> Dataset:
    """``"digits"`` or the path of a ``.npz`` file."""
    if not isinstance(spec, str):
        raise TypeError(f"dataset must be 'digits' or a path to a .npz file, got {type(spec).__name__}")
    if spec == "digits":
        return load_digits(seed, valid_fraction)
    if spec.endswith(".npz"):
        return load_npz(spec, seed, valid_fraction)
    raise ValueError(f"dataset must be 'digits' or a path ending in .npz, got {spec!r}")


def batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index batches of one epoch, shuffled by the (seed, epoch) stream; the last may be smaller."""
    order = torch.randperm(n, generator=rng.generator(seed, rng.SHUFFLE, epoch)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@dataclass
class Augment:
    """Random shift (a crop of the zero-padded image at a random offset, up to ``shift`` pixels
    each way; images only) and additive Gaussian noise of std ``noise``, per sample."""

    shift: int = 1
    noise: float = 0.1

    def __post_init__(self):
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise ValueError(f"shift must be an int >= 0, got {self.shift!r}")
        self.noise = check_number("noise", self.noise, low=0.0)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if x.dim() == 4 and self.shift > 0:
            x = self._shift(x, gen)
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return x

    def _shift(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.shift
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=x.device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[bi, ci, rows, cols]


def make_views(x: torch.Tensor, num_views: int, augment: Augment, gen: torch.Generator) -> torch.Tensor:
    """``num_views`` independent augmentations of the batch, concatenated view-major ``[V*B, ...]``
    (row v*B + b is view v of sample b: the layout ffkern's losses take), so that a layer runs
    once on all views instead of once per view."""
    return torch.cat([augment(x, gen) for _ in range(num_views)], 0)
