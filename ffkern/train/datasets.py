"""Readers of the standard dataset files, as their publishers ship them (no download here).

  mnist, fashion-mnist  the four IDX files, each optionally gzipped:
                        train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
                        t10k-labels-idx1-ubyte (in DIR, or in torchvision's DIR/MNIST/raw etc.)
  cifar10               cifar-10-batches-py/ (data_batch_1..5, test_batch) or cifar-10-python.tar.gz
  cifar100              cifar-100-python/ (train, test; fine labels) or cifar-100-python.tar.gz
  svhn                  train_32x32.mat, test_32x32.mat (scipy; label 10 is the digit 0)
  folder                DIR/train/<class>/*.png|jpg|jpeg and DIR/test/<class>/... (or DIR/val/...);
                        images found at any depth under a class folder (Pillow)

Everything is parsed with numpy. The CIFAR batches are pickles by format: they alone are
unpickled, by an unpickler that builds nothing but containers, numbers, strings and uint8/integer
numpy arrays. Every reader returns uint8 images [N, C, H, W] and int64 labels 0..C-1, and refuses
a missing file, a wrong folder, a truncated file or inconsistent shapes with a DatasetError
(ValueError) or FileNotFoundError that names the file and the layout it expected.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .data import Dataset, DatasetError, MissingDependency, make_uint8_dataset

Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]  # x_train, y_train, x_test, y_test, classes


def load_named(name: str, data_dir: str, *, seed: int = 0, valid_fraction: float = 0.1) -> Dataset:
    """Reads dataset ``name`` from ``data_dir`` and makes the seeded train / valid / test Dataset."""
    readers: Dict[str, Callable[[str], Arrays]] = {
        "mnist": lambda d: read_idx_dataset(d, "mnist"), "fashion-mnist": lambda d: read_idx_dataset(d, "fashion-mnist"),
        "cifar10": read_cifar10, "cifar100": read_cifar100, "svhn": read_svhn, "folder": read_image_folder}
    if name not in readers:
        raise ValueError(f"unknown dataset {name!r}; one of {sorted(readers)}")
    data_dir = os.fspath(data_dir)
    if not os.path.exists(data_dir):
        raise FileNotFoundError(f"--data-dir {data_dir}: no such folder (it should hold the {name} files: {LAYOUTS[name]})")
    x_train, y_train, x_test, y_test, classes = readers[name](data_dir)
    label = name if name != "folder" else f"folder:{os.path.basename(os.path.normpath(data_dir))}"
    return make_uint8_dataset(label, x_train, y_train, x_test, y_test, classes, seed, valid_fraction)


LAYOUTS = {
    "mnist": "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
             " (each may be .gz), as published",
    "fashion-mnist": "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,"
                     " t10k-labels-idx1-ubyte (each may be .gz), as published",
    "cifar10": "the python version: cifar-10-batches-py/ (data_batch_1..5, test_batch) or cifar-10-python.tar.gz",
    "cifar100": "the python version: cifar-100-python/ (train, test) or cifar-100-python.tar.gz",
    "svhn": "train_32x32.mat and test_32x32.mat (the cropped-digits format)",
    "folder": "train/<class>/*.png|jpg and test/<class>/*.png|jpg (or val/<class>/...)",
}


def _listing(folder: str) -> str:
    """What a wrong folder holds, for the error message."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return ""
    if not names:
        return "; the folder is empty"
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"; it holds: {shown}"


def _need_folder(data_dir: str, name: str) -> None:
    if not os.path.isdir(data_dir):
        raise DatasetError(f"--data-dir {data_dir}: is a file, not a folder; {name} expects a folder with {LAYOUTS[name]}")


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)
# IDX: two zero bytes, a type code, the number of dimensions, then each dimension as a big-endian
# uint32, then the values in C order, big-endian.
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
              "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
# torchvision keeps the same files in DIR/<Name>/raw
_IDX_SUBDIRS = {"mnist": ("", "raw", os.path.join("MNIST", "raw")),
                "fashion-mnist": ("", "raw", os.path.join("FashionMNIST", "raw"))}


def read_idx(path: str) -> np.ndarray:
    """One IDX file (gzipped when it ends in .gz), as a numpy array of its dimensions."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: cannot be read as {'a gzipped ' if path.endswith('.gz') else 'an '}IDX file"
                           f" (truncated or damaged?): {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DatasetError(f"{path}: not an IDX file (it starts with {data[:4]!r}; IDX starts with 0, 0, a type code"
                           " and the number of dimensions)")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes, the header of {ndim} dimensions needs {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        what = "truncated" if len(data) - header < expected else "longer than its header says"
        raise DatasetError(f"{path}: {what}: the header says {list(dims)} values of {dtype.itemsize} byte(s),"
                           f" {expected} bytes, the file has {len(data) - header}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims)


def _find_idx(data_dir: str, name: str, key: str) -> str:
    base = _IDX_FILES[key]
    # the files as published, and as some mirrors spell them (train-images.idx3-ubyte)
    variants = [base, base.replace("-idx", ".idx")]
    for sub in _IDX_SUBDIRS[name]:
        for stem in variants:
            for ext in ("", ".gz"):
                path = os.path.join(data_dir, sub, stem + ext)
                if os.path.isfile(path):
                    return path
    raise FileNotFoundError(f"{name}: {os.path.join(data_dir, base)}[.gz] not found; --data-dir should hold the"
                            f" four IDX files {LAYOUTS[name]}{_listing(data_dir)}")


def read_idx_dataset(data_dir: str, name: str = "mnist") -> Arrays:
    """MNIST or Fashion-MNIST (same format and file names): 28x28 one-channel images, 10 classes."""
    _need_folder(data_dir, name)
    paths = {key: _find_idx(data_dir, name, key) for key in _IDX_FILES}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        px, py = paths[f"{split}_x"], paths[f"{split}_y"]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise DatasetError(f"{px}: {name} images must be an IDX array of uint8 [N, 28, 28], got {x.dtype} {list(x.shape)}")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise DatasetError(f"{py}: {name} labels must be an IDX array of uint8 [N], got {y.dtype} {list(y.shape)}")
        if len(x) != len(y):
            raise DatasetError(f"{py}: {len(y)} labels but {px} has {len(x)} images")
        if len(y) and int(y.max()) > 9:
            raise DatasetError(f"{py}: labels must be 0..9, found {int(y.max())}")
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DatasetError(f"{paths['test_x']}: test images are {list(arrays['test_x'].shape[1:])}, training images"
                           f" {list(arrays['train_x'].shape[1:])}")
    return (arrays["train_x"][:, None], arrays["train_y"].astype(np.int64), arrays["test_x"][:, None],
            arrays["test_y"].astype(np.int64), 10)


# ---------------------------------------------------------------- CIFAR (python version)
def _reconstruct(cls, shape, typecode):
    """numpy's array-unpickling entry point, for plain ndarrays only."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("only numpy.ndarray may be rebuilt")
    return _NUMPY_RECONSTRUCT(cls, shape, typecode)


_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own _reconstruct, wherever numpy keeps it
# The dtypes a CIFAR batch can hold (uint8 pixels; labels are lists, or integer arrays when re-saved).
_CIFAR_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}


def _dtype(obj, align=False, copy=False):
    name = obj.decode("latin1") if isinstance(obj, bytes) else obj
    if name not in _CIFAR_DTYPES:
        raise pickle.UnpicklingError(f"dtype {name!r} is not allowed in a CIFAR batch (integer arrays only)")
    return np.dtype(name, bool(align), bool(copy))


# Exactly the globals an array in a CIFAR batch refers to: the official files were written by
# Python 2's cPickle (protocol 2): a dict of str keys, lists of ints and str, and numpy arrays,
# which pickle as numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b') plus state, with
# numpy.dtype('u1', 0, 1). numpy 2 names the module numpy._core.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR batch holds; any other global (a function to call, a class to
    make) is refused before it is looked up."""

    def find_class(self, module, name):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a CIFAR batch")


def unpickle_cifar_batch(data: bytes, where: str) -> Dict[str, object]:
    """One CIFAR batch file's bytes -> its dict with str keys."""
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, MemoryError, OverflowError) as exc:
        raise DatasetError(f"{where}: not a readable CIFAR batch (truncated, damaged, or not the python version):"
                           f" {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: a CIFAR batch is a pickled dict, this file holds a {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_arrays(batch: Dict[str, object], label_key: str, classes: int, where: str) -> Tuple[np.ndarray, np.ndarray]:
    for key in ("data", label_key):
        if key not in batch:
            raise DatasetError(f"{where}: the batch has no {key!r} entry (has {sorted(batch)})")
    x, y = batch["data"], batch[label_key]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        desc = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DatasetError(f"{where}: 'data' must be a uint8 array [N, 3072] (32x32 RGB, channel planes), got {desc}")
    if isinstance(y, np.ndarray):
        y = y.reshape(-1)
    elif isinstance(y, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in y):
        y = np.asarray(y, dtype=np.int64)
    else:
        raise DatasetError(f"{where}: {label_key!r} must be a list of ints")
    y = np.asarray(y).astype(np.int64)
    if len(y) != len(x):
        raise DatasetError(f"{where}: {len(y)} labels but {len(x)} images")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise DatasetError(f"{where}: {label_key!r} must be 0..{classes - 1}, found {int(y.min())}..{int(y.max())}")
    return x.reshape(-1, 3, 32, 32), y  # rows: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major


class _Source:
    """The member files of the extracted folder or of the unopened .tar.gz (read in memory, never
    extracted to disk)."""

    def __init__(self, folder: Optional[str] = None, archive: Optional[str] = None, inner: str = ""):
        self.folder, self.archive, self.inner = folder, archive, inner
        self._tar = None

    def where(self, member: str) -> str:
        if self.folder is not None:
            return os.path.join(self.folder, member)
        return f"{self.archive}:{self.inner}/{member}"

    def read(self, member: str, layout: str) -> bytes:
        if self.folder is not None:
            path = os.path.join(self.folder, member)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found; expected {layout}{_listing(self.folder)}")
            with open(path, "rb") as f:
                return f.read()
        try:
            if self._tar is None:
                self._tar = tarfile.open(self.archive, "r:gz")
            try:
                info = self._tar.getmember(f"{self.inner}/{member}")
            except KeyError:
                raise FileNotFoundError(f"{self.archive}: has no member {self.inner}/{member}; expected {layout}") from None
            f = self._tar.extractfile(info)
            if f is None:
                raise DatasetError(f"{self.archive}: {self.inner}/{member} is not a regular file")
            return f.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise DatasetError(f"{self.archive}: not a readable .tar.gz (truncated or damaged?): {exc}") from None

    def close(self):
        if self._tar is not None:
            self._tar.close()


def _cifar_source(data_dir: str, folder: str, archive: str, first: str, name: str) -> _Source:
    """DIR/<folder>/, DIR itself when it is that folder, DIR/<archive>, or --data-dir naming the
    archive file itself."""
    if os.path.isfile(data_dir):
        if data_dir.endswith((".tar.gz", ".tgz")):
            return _Source(archive=data_dir, inner=folder)
        raise DatasetError(f"--data-dir {data_dir}: is a file, not a folder or a .tar.gz; {name} expects {LAYOUTS[name]}")
    for candidate in (os.path.join(data_dir, folder), data_dir):
        if os.path.isfile(os.path.join(candidate, first)):
            return _Source(folder=candidate)
    if os.path.isfile(os.path.join(data_dir, archive)):
        return _Source(archive=os.path.join(data_dir, archive), inner=folder)
    raise FileNotFoundError(f"{name}: neither {os.path.join(data_dir, folder, first)} nor"
                            f" {os.path.join(data_dir, archive)} found; --data-dir should hold {LAYOUTS[name]}"
                            f"{_listing(data_dir)}")


def _read_cifar(data_dir: str, name: str, folder: str, archive: str, train: List[str], test: str, label_key: str,
                classes: int) -> Arrays:
    src = _cifar_source(data_dir, folder, archive, train[0], name)
    try:
        parts = {}
        for member in train + [test]:
            batch = unpickle_cifar_batch(src.read(member, LAYOUTS[name]), src.where(member))
            parts[member] = _cifar_arrays(batch, label_key, classes, src.where(member))
    finally:
        src.close()
    x_train = np.concatenate([parts[m][0] for m in train])
    y_train = np.concatenate([parts[m][1] for m in train])
    return x_train, y_train, parts[test][0], parts[test][1], classes


def read_cifar10(data_dir: str) -> Arrays:
    return _read_cifar(data_dir, "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                       [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", 10)


def read_cifar100(data_dir: str) -> Arrays:
    return _read_cifar(data_dir, "cifar100", "cifar-100-python", "cifar-100-python.tar.gz", ["train"], "test",
                       "fine_labels", 100)


# ---------------------------------------------------------------- SVHN (.mat)
def _svhn_split(path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        import scipy.io
    except ImportError as exc:
        raise MissingDependency("the svhn dataset reads .mat files with scipy: pip install scipy"
                                " (or pip install 'ffkern[data]')") from exc
    if not os.path.isfile(path):
        raise FileNotFoundError(f"svhn: {path} not found; --data-dir should hold {LAYOUTS['svhn']}{_listing(os.path.dirname(path))}")
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except (ValueError, TypeError, OSError, EOFError, NotImplementedError, zlib.error, struct.error,
            MemoryError, KeyError, IndexError) as exc:
        raise DatasetError(f"{path}: not a readable MATLAB file (truncated or damaged?): {type(exc).__name__}: {exc}") from None
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path}: an SVHN .mat holds X (32x32x3xN uint8) and y (Nx1), this one has"
                           f" {sorted(k for k in mat if not k.startswith('__'))}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise DatasetError(f"{path}: X must be uint8 [H, W, 3, N] (SVHN's cropped digits), got {x.dtype} {list(x.shape)}")
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind not in "iuf" or (y.dtype.kind == "f" and not np.array_equal(y, np.round(y))):
        raise DatasetError(f"{path}: y must hold integer labels 1..10, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) != x.shape[3]:
        raise DatasetError(f"{path}: {len(y)} labels in y but {x.shape[3]} images in X")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DatasetError(f"{path}: y must be 1..10 (10 is the digit 0), found {int(y.min())}..{int(y.max())}")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10  # [N, 3, H, W]; label 10 is the digit 0


def read_svhn(data_dir: str) -> Arrays:
    _need_folder(data_dir, "svhn")
    x_train, y_train = _svhn_split(os.path.join(data_dir, "train_32x32.mat"))
    x_test, y_test = _svhn_split(os.path.join(data_dir, "test_32x32.mat"))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"{os.path.join(data_dir, 'test_32x32.mat')}: test images are {list(x_test.shape[1:])},"
                           f" training images {list(x_train.shape[1:])}")
    return x_train, y_train, x_test, y_test, 10


# ---------------------------------------------------------------- a folder of images per class
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _class_files(split_dir: str) -> Dict[str, List[str]]:
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    files = {}
    for c in classes:
        found = []
        for root, dirs, names in os.walk(os.path.join(split_dir, c)):
            dirs.sort()
            found += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise DatasetError(f"{os.path.join(split_dir, c)}: a class folder without .png/.jpg images; expected"
                               f" {LAYOUTS['folder']}")
        files[c] = found
    if not files:
        raise DatasetError(f"{split_dir}: no class folders in it; expected {LAYOUTS['folder']}{_listing(split_dir)}")
    return files


def read_image_folder(data_dir: str) -> Arrays:
    """Classes are the sub-folders of train/ in sorted order; test/ (or val/) must use the same
    names. Every image must have the size of the first; grayscale images stay one channel unless
    some image has colour, then all are RGB."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingDependency("the folder dataset reads images with Pillow: pip install Pillow"
                                " (or pip install 'ffkern[data]')") from exc
    _need_folder(data_dir, "folder")
    train_dir = os.path.join(data_dir, "train")
    test_dir = next((os.path.join(data_dir, s) for s in ("test", "val") if os.path.isdir(os.path.join(data_dir, s))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        missing = "train/" if not os.path.isdir(train_dir) else "test/ (or val/)"
        raise FileNotFoundError(f"folder: {data_dir} has no {missing}; expected {LAYOUTS['folder']}{_listing(data_dir)}")
    train_files = _class_files(train_dir)
    test_files = _class_files(test_dir)
    unknown = sorted(set(test_files) - set(train_files))
    if unknown:
        raise DatasetError(f"{test_dir}: classes {unknown[:5]} are not in {train_dir} (the classes are the train/"
                           " sub-folders; test/ must use the same names)")
    index = {c: i for i, c in enumerate(train_files)}
    listed = [(f, index[c]) for c, fs in train_files.items() for f in fs]
    n_train = len(listed)
    listed += [(f, index[c]) for c, fs in test_files.items() for f in fs]

    x, colour, size = None, False, None
    for i, (path, _) in enumerate(listed):
        try:
            with Image.open(path) as img:
                img.load()
                if size is None:
                    size = img.size
                    x = np.empty((len(listed), 3, size[1], size[0]), np.uint8)  # filled in place: one copy in memory
                elif img.size != size:
                    raise DatasetError(f"{path}: image is {img.size[0]}x{img.size[1]}, the first image"
                                       f" ({listed[0][0]}) is {size[0]}x{size[1]}; every image must have one size")
                colour = colour or img.mode not in _GRAY_MODES
                x[i] = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(f"{path}: not a readable image (truncated or damaged?): {exc}") from None
    if not colour:
        x = np.ascontiguousarray(x[:, :1])
    y = np.asarray([label for _, label in listed], dtype=np.int64)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], len(index)
