"""The standard dataset files (ffkern/train/datasets.py), from small fakes written here in each exact
on-disk format: IDX (plain and .gz), the CIFAR python batches (Python 2 protocol-2 pickles, as a
folder and as the unopened .tar.gz), SVHN's .mat, a folder of PNG/JPEG images per class. Then the
uint8 store, the protocol options (label noise, train fraction, top-k) and their CLI errors."""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import sys
import tarfile

import numpy as np
import pytest
import torch

from ffkern.cli import main
from ffkern.train.data import (NAMED_DATASETS, DatasetError, ImageStore, MissingDependency, apply_protocol,
                               input_abs_max, load_dataset)
from ffkern.train.datasets import read_idx, unpickle_cifar_batch
from ffkern.train.trainer import TrainConfig, topk_accuracy, train

TINY = ["--epochs", "1", "--width", "16", "--layers", "1", "--head-epochs", "1", "--backend", "reference",
        "--no-progress", "--device", "cpu", "--batch-size", "32"]


# ---------------------------------------------------------------- writers of the exact formats
def write_idx(path, array: np.ndarray) -> str:
    """IDX: 0, 0, type code (0x08 = ubyte), number of dimensions, big-endian uint32 dimensions, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return str(path)


def fake_images(n, shape, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def balanced(n, classes, seed):
    return np.random.default_rng(seed).permutation(np.arange(n) % classes).astype(np.uint8)


def write_mnist(folder, gz=False, n_train=60, n_test=20, sub=""):
    d = os.path.join(folder, sub)
    os.makedirs(d, exist_ok=True)
    ext = ".gz" if gz else ""
    x, y = fake_images(n_train, (28, 28), 1), balanced(n_train, 10, 2)
    xt, yt = fake_images(n_test, (28, 28), 3), balanced(n_test, 10, 4)
    write_idx(os.path.join(d, "train-images-idx3-ubyte" + ext), x)
    write_idx(os.path.join(d, "train-labels-idx1-ubyte" + ext), y)
    write_idx(os.path.join(d, "t10k-images-idx3-ubyte" + ext), xt)
    write_idx(os.path.join(d, "t10k-labels-idx1-ubyte" + ext), yt)
    return x, y, xt, yt


class Py2Pickle:
    """Writes what Python 2's cPickle.dump(obj, f, 2) wrote for the CIFAR batches: str as
    BINSTRING (bytes to Python 3), ints, lists, dicts, and numpy arrays through
    numpy.core.multiarray._reconstruct + BUILD with the (version, shape, dtype, fortran, bytes) state."""

    def __init__(self):
        self.out = io.BytesIO()

    def dump(self, obj) -> bytes:
        self.out.write(b"\x80\x02")
        self.obj(obj)
        self.out.write(b".")
        return self.out.getvalue()

    def w(self, b):
        self.out.write(b)

    def str2(self, s: bytes):
        if len(s) < 256:
            self.w(b"U" + bytes([len(s)]) + s)
        else:
            self.w(b"T" + struct.pack("<I", len(s)) + s)

    def int(self, v):
        if 0 <= v < 256:
            self.w(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.w(b"M" + struct.pack("<H", v))
        else:
            self.w(b"J" + struct.pack("<i", v))

    def obj(self, o):
        if isinstance(o, bytes):
            self.str2(o)
        elif isinstance(o, bool):
            self.w(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            self.int(o)
        elif o is None:
            self.w(b"N")
        elif isinstance(o, list):
            self.w(b"](")
            for v in o:
                self.obj(v)
            self.w(b"e")
        elif isinstance(o, dict):
            self.w(b"}(")
            for k, v in o.items():
                self.obj(k)
                self.obj(v)
            self.w(b"u")
        elif isinstance(o, tuple):
            self.w(b"(")
            for v in o:
                self.obj(v)
            self.w(b"t")
        elif isinstance(o, np.ndarray):
            self.array(o)
        else:
            raise TypeError(type(o))

    def array(self, a):
        self.w(b"cnumpy.core.multiarray\n_reconstruct\n")
        self.w(b"cnumpy\nndarray\n")
        self.obj((0,))
        self.str2(b"b")
        self.w(b"\x87R")  # TUPLE3, REDUCE
        self.w(b"(")  # state
        self.int(1)
        self.obj(tuple(a.shape))
        self.w(b"cnumpy\ndtype\n")
        self.str2(a.dtype.str[1:].encode())  # 'u1'
        self.int(0)
        self.int(1)
        self.w(b"\x87R")
        self.obj((3, a.dtype.str[:1].encode().replace(b"=", b"<"), None, None, None, -1, -1, 0))
        self.w(b"b")  # BUILD the dtype
        self.w(b"\x89")  # not Fortran order
        self.str2(np.ascontiguousarray(a).tobytes())
        self.w(b"tb")  # the state tuple, BUILD the array


def py2_pickle(obj) -> bytes:
    return Py2Pickle().dump(obj)


def cifar_batch(n, classes, seed, label_key=b"labels", extra=None):
    x = fake_images(n, (3072,), seed)
    y = [int(v) for v in balanced(n, classes, seed + 1)]
    batch = {b"batch_label": b"training batch 1 of 5", label_key: y, b"data": x,
             b"filenames": [b"img_%d.png" % i for i in range(n)]}
    batch.update(extra or {})
    return batch, x, np.asarray(y)


def write_cifar10(root, n=12, as_tar=False):
    """cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta (or its .tar.gz)."""
    files, xs, ys = {}, [], []
    for i in range(1, 6):
        batch, x, y = cifar_batch(n, 10, 10 * i)
        files[f"data_batch_{i}"] = py2_pickle(batch)
        xs.append(x)
        ys.append(y)
    test, xt, yt = cifar_batch(n, 10, 99)
    files["test_batch"] = py2_pickle(test)
    files["batches.meta"] = py2_pickle({b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": n, b"num_vis": 3072})
    _write_tree(root, "cifar-10-batches-py", "cifar-10-python.tar.gz", files, as_tar)
    return np.concatenate(xs), np.concatenate(ys), xt, yt


def write_cifar100(root, n=200, as_tar=False):
    files = {}
    train, x, y = cifar_batch(n, 100, 5, label_key=b"fine_labels",
                              extra={b"coarse_labels": [int(v) for v in np.arange(n) % 20]})
    test, xt, yt = cifar_batch(100, 100, 6, label_key=b"fine_labels", extra={b"coarse_labels": [0] * 100})
    files["train"], files["test"] = py2_pickle(train), py2_pickle(test)
    files["meta"] = py2_pickle({b"fine_label_names": [b"apple"] * 100, b"coarse_label_names": [b"fish"] * 20})
    _write_tree(root, "cifar-100-python", "cifar-100-python.tar.gz", files, as_tar)
    return x, y, xt, yt


def _write_tree(root, folder, archive, files, as_tar):
    os.makedirs(root, exist_ok=True)
    if as_tar:
        with tarfile.open(os.path.join(root, archive), "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(root, folder, name), "wb") as f:
                f.write(data)


# ---------------------------------------------------------------- MNIST / Fashion-MNIST
@pytest.mark.parametrize("name,gz,sub", [("mnist", False, ""), ("mnist", True, ""), ("fashion-mnist", True, ""),
                                         ("mnist", False, "MNIST/raw")])
def test_idx_datasets_load(name, gz, sub, tmp_path):
    x, y, xt, yt = write_mnist(str(tmp_path), gz=gz, sub=sub)
    d = load_dataset(name, seed=0, data_dir=str(tmp_path))
    assert d.num_classes == 10 and d.sample_shape == (1, 28, 28) and d.is_image
    assert isinstance(d.x_train, ImageStore) and d.x_train.raw.dtype == torch.uint8
    assert len(d.y_train) + len(d.y_valid) == 60 and len(d.y_valid) == 10 and len(d.y_test) == 20
    assert d.x_train[:5].dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert torch.equal(d.x_test.raw[:, 0], torch.from_numpy(xt))  # test split in file order
    assert d.y_test.tolist() == yt.tolist()
    labels = torch.cat([d.y_train, d.y_valid])
    assert sorted(labels.tolist()) == sorted(y.tolist()) and 0 <= int(labels.min()) and int(labels.max()) <= 9


def test_idx_reader_reads_the_header(tmp_path):
    a = fake_images(3, (4, 5), 0)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a-idx3-ubyte", a)), a)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a-idx3-ubyte.gz", a)), a)


def _corrupt(path, how):
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[:len(data) - 7]
    elif how == "magic":
        data = b"\x1f\x00" + data[2:]
    elif how == "longer":
        data = data + b"\x00"
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how,message", [("truncated", "truncated: the header says"), ("magic", "not an IDX file"),
                                         ("longer", "longer than its header says")])
def test_idx_damaged_files_are_named(how, message, tmp_path):
    write_mnist(str(tmp_path))
    path = str(tmp_path / "t10k-images-idx3-ubyte")
    _corrupt(path, how)
    with pytest.raises(DatasetError, match=message) as e:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert path in str(e.value)


def test_idx_truncated_gzip_and_inconsistent_files(tmp_path):
    write_mnist(str(tmp_path), gz=True)
    gz = str(tmp_path / "train-images-idx3-ubyte.gz")
    data = open(gz, "rb").read()
    open(gz, "wb").write(data[:len(data) // 2])
    with pytest.raises(DatasetError, match="gzipped IDX file") as e:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert gz in str(e.value)
    other = tmp_path / "other"
    write_mnist(str(other))
    write_idx(other / "train-labels-idx1-ubyte", balanced(59, 10, 0))  # one label short
    with pytest.raises(DatasetError, match="59 labels but .* has 60 images"):
        load_dataset("mnist", data_dir=str(other))
    write_idx(other / "train-labels-idx1-ubyte", np.full(60, 11, np.uint8))
    with pytest.raises(DatasetError, match="labels must be 0..9"):
        load_dataset("mnist", data_dir=str(other))


def test_idx_missing_file_and_wrong_folder(tmp_path):
    write_cifar10(str(tmp_path))  # the wrong dataset's folder
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*four IDX files.*it holds: cifar-10-batches-py"):
        load_dataset("mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data_dir|--data-dir"):
        load_dataset("mnist")


# ---------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar10_folder_and_tar_gz(as_tar, tmp_path):
    x, y, xt, yt = write_cifar10(str(tmp_path), as_tar=as_tar)
    d = load_dataset("cifar10", seed=1, data_dir=str(tmp_path))
    assert d.name == "cifar10" and d.num_classes == 10 and d.sample_shape == (3, 32, 32)
    assert len(d.y_train) + len(d.y_valid) == 60 and len(d.y_test) == 12
    # rows are 1024 red, 1024 green, 1024 blue values: [N, 3, 32, 32] by reshape
    assert torch.equal(d.x_test.raw, torch.from_numpy(xt.reshape(-1, 3, 32, 32)))
    assert d.y_test.tolist() == yt.tolist() and d.x_train.raw.dtype == torch.uint8
    assert int(torch.cat([d.y_train, d.y_valid]).max()) <= 9
    if as_tar:  # --data-dir may name the archive itself
        again = load_dataset("cifar10", seed=1, data_dir=str(tmp_path / "cifar-10-python.tar.gz"))
        assert torch.equal(again.x_train.raw, d.x_train.raw)
    else:  # or the batches folder itself
        again = load_dataset("cifar10", seed=1, data_dir=str(tmp_path / "cifar-10-batches-py"))
        assert torch.equal(again.y_train, d.y_train)


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar100_fine_labels(as_tar, tmp_path):
    x, y, xt, yt = write_cifar100(str(tmp_path), as_tar=as_tar)
    d = load_dataset("cifar100", data_dir=str(tmp_path), valid_fraction=0.0 + 0.5)
    assert d.num_classes == 100 and d.sample_shape == (3, 32, 32)
    assert d.y_test.tolist() == yt.tolist()  # fine labels, not the coarse ones (all 0 in the test batch)
    assert int(torch.cat([d.y_train, d.y_valid]).max()) == 99


def test_cifar_real_pickle_of_numpy_arrays_also_loads(tmp_path):
    # a batch re-saved by Python 3 (bytes keys, protocol 4): the same globals, so it loads too
    x = fake_images(4, (3072,), 0)
    batch = unpickle_cifar_batch(pickle.dumps({b"data": x, b"labels": [1, 2, 3, 4]}, protocol=4), "re-saved")
    assert np.array_equal(batch["data"], x) and batch["labels"] == [1, 2, 3, 4]


class Trap:
    """Unpickling this creates a file: proof that a loader ran code from a pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("kind", ["trap", "os_system", "object_array", "truncated", "not_a_dict", "no_data", "bad_shape",
                                  "label_range"])
def test_cifar_batches_are_unpickled_restrictively(kind, tmp_path):
    write_cifar10(str(tmp_path))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    marker = tmp_path / "unpickled"
    if kind == "trap":
        path.write_bytes(pickle.dumps({b"data": Trap(str(marker))}, protocol=2))
    elif kind == "os_system":
        command = f"touch {marker}".encode()
        path.write_bytes(b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R.")
    elif kind == "object_array":
        path.write_bytes(pickle.dumps({b"data": np.array([1, "a"], dtype=object), b"labels": [0, 1]}, protocol=2))
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "not_a_dict":
        path.write_bytes(py2_pickle([1, 2]))
    elif kind == "no_data":
        path.write_bytes(py2_pickle({b"labels": [0]}))
    elif kind == "bad_shape":
        path.write_bytes(py2_pickle({b"data": fake_images(2, (100,), 0), b"labels": [0, 1]}))
    elif kind == "label_range":
        path.write_bytes(py2_pickle({b"data": fake_images(2, (3072,), 0), b"labels": [0, 10]}))
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_cifar_missing_and_wrong_files(tmp_path):
    write_cifar10(str(tmp_path))
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(FileNotFoundError, match="test_batch not found; expected the python version"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz found.*it holds: cifar-10-batches-py"):
        load_dataset("cifar100", data_dir=str(tmp_path))
    tar_dir = tmp_path / "t"
    write_cifar10(str(tar_dir), as_tar=True)
    archive = tar_dir / "cifar-10-python.tar.gz"
    data = archive.read_bytes()
    archive.write_bytes(data[:len(data) // 2])
    with pytest.raises(DatasetError, match="not a readable .tar.gz") as e:
        load_dataset("cifar10", data_dir=str(tar_dir))
    assert str(archive) in str(e.value)


# ---------------------------------------------------------------- SVHN
def write_svhn(folder, n_train=60, n_test=20):
    import scipy.io

    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x = fake_images(n, (32, 32, 3), seed).transpose(1, 2, 3, 0)  # [32, 32, 3, N] as published
        digits = balanced(n, 10, seed + 5)
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]  # [N, 1], the digit 0 is label 10
        scipy.io.savemat(os.path.join(folder, f"{split}_32x32.mat"), {"X": x, "y": y})
        out[split] = (x, digits)
    return out


def test_svhn_mat_files(tmp_path):
    parts = write_svhn(str(tmp_path))
    d = load_dataset("svhn", data_dir=str(tmp_path))
    assert d.num_classes == 10 and d.sample_shape == (3, 32, 32) and len(d.y_test) == 20
    x, digits = parts["test"]
    assert d.y_test.tolist() == digits.tolist()  # 10 became 0
    assert torch.equal(d.x_test.raw, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    assert set(torch.cat([d.y_train, d.y_valid]).tolist()) == set(range(10))


def test_svhn_errors(tmp_path, monkeypatch):
    write_svhn(str(tmp_path))
    test_mat = tmp_path / "test_32x32.mat"
    data = test_mat.read_bytes()
    test_mat.write_bytes(data[:len(data) // 3])
    with pytest.raises(DatasetError, match="not a readable MATLAB file") as e:
        load_dataset("svhn", data_dir=str(tmp_path))
    assert str(test_mat) in str(e.value)
    os.remove(test_mat)
    with pytest.raises(FileNotFoundError, match="test_32x32.mat not found"):
        load_dataset("svhn", data_dir=str(tmp_path))
    import scipy.io

    scipy.io.savemat(str(test_mat), {"X": fake_images(2, (32, 32, 3), 0).transpose(1, 2, 3, 0), "y": np.array([[0], [3]])})
    with pytest.raises(DatasetError, match="y must be 1..10"):
        load_dataset("svhn", data_dir=str(tmp_path))
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # scipy not installed
    with pytest.raises(MissingDependency, match="pip install scipy"):
        load_dataset("svhn", data_dir=str(tmp_path))


# ---------------------------------------------------------------- a folder of images per class
def write_folder(root, classes=("cat", "dog", "emu"), per_class=6, test_name="test", size=(12, 10), gray=False):
    from PIL import Image

    g = np.random.default_rng(0)
    for split, n in (("train", per_class), (test_name, 2)):
        for c in classes:
            d = os.path.join(root, split, c, "images")  # nested, as Tiny-ImageNet's train/<wnid>/images/
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
                img = Image.fromarray(g.integers(0, 256, shape, dtype=np.uint8))
                ext = ".png" if i % 2 == 0 else ".JPEG"
                img.save(os.path.join(d, f"{c}_{i}{ext}"), format="PNG" if ext == ".png" else "JPEG")


def test_image_folder(tmp_path):
    write_folder(str(tmp_path))
    d = load_dataset("folder", data_dir=str(tmp_path), valid_fraction=0.2)
    assert d.num_classes == 3 and d.sample_shape == (3, 10, 12)  # [C, H, W] of 12 wide, 10 high
    assert len(d.y_test) == 6 and len(d.y_train) + len(d.y_valid) == 18
    assert d.y_test.tolist() == [0, 0, 1, 1, 2, 2]  # classes in sorted folder order
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "test" / "cat" / "images" / "cat_0.png"))
    assert torch.equal(d.x_test.raw[0], torch.from_numpy(first.transpose(2, 0, 1).copy()))
    gray = tmp_path / "gray"
    write_folder(str(gray), test_name="val", gray=True)  # val/ when there is no test/
    g = load_dataset("folder", data_dir=str(gray), valid_fraction=0.2)
    assert g.sample_shape == (1, 10, 12) and g.name == "folder:gray"


def test_image_folder_errors(tmp_path, monkeypatch):
    from PIL import Image

    write_folder(str(tmp_path))
    odd = tmp_path / "train" / "dog" / "odd.png"
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(odd)
    with pytest.raises(DatasetError, match="odd.png: image is 5x5, the first image .* is 12x10"):
        load_dataset("folder", data_dir=str(tmp_path))
    odd.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError, match="odd.png: not a readable image"):
        load_dataset("folder", data_dir=str(tmp_path))
    os.remove(odd)
    os.makedirs(tmp_path / "test" / "yak")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "test" / "yak" / "a.png")
    with pytest.raises(DatasetError, match=r"classes \['yak'\] are not in"):
        load_dataset("folder", data_dir=str(tmp_path))
    empty = tmp_path / "e"
    os.makedirs(empty / "train" / "a")
    os.makedirs(empty / "test" / "a")
    with pytest.raises(DatasetError, match="a class folder without .png/.jpg images"):
        load_dataset("folder", data_dir=str(empty))
    with pytest.raises(FileNotFoundError, match="has no train/"):
        load_dataset("folder", data_dir=str(tmp_path / "train"))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(MissingDependency, match="pip install Pillow"):
        load_dataset("folder", data_dir=str(tmp_path))


# ---------------------------------------------------------------- the uint8 store
def test_image_store_standardizes_per_batch(tmp_path):
    write_cifar10(str(tmp_path))
    d = load_dataset("cifar10", data_dir=str(tmp_path))
    full = d.x_train.materialize()
    assert full.dtype == torch.float32 and full.shape == d.x_train.shape
    # training statistics: every channel has mean 0 and std 1 over the training split
    assert full.mean((0, 2, 3)).abs().max() < 1e-4 and (full.std((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    idx = torch.tensor([3, 0, 7])
    expect = (d.x_train.raw[idx].double() / 255 - d.pixel_mean.double()[:, None, None]) / d.pixel_std.double()[:, None, None]
    assert torch.allclose(d.x_train[idx].double(), expect, atol=1e-5)
    assert torch.equal(d.x_train[2], full[2]) and torch.equal(d.x_train[1:4], full[1:4])
    # it stands where a tensor stood: torch functions and tensor methods act on the converted whole
    assert torch.equal(torch.cat([d.x_valid]), d.x_valid.materialize()) and torch.isfinite(d.x_test).all()
    assert input_abs_max(d.x_train) == pytest.approx(float(full.abs().max()), rel=1e-6)
    moved = d.to("cpu")
    assert isinstance(moved.x_train, ImageStore) and len(moved.x_train) == len(d.y_train)
    assert d.x_train.raw.element_size() == 1  # 8-bit on the device, 150 MB for the real CIFAR-10


def test_npz_of_uint8_images_is_stored_8_bit(tmp_path):
    g = np.random.default_rng(0)
    path = tmp_path / "c.npz"
    np.savez(path, x_train=g.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y_train=np.arange(40) % 4,
             x_test=g.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y_test=np.arange(8) % 4)
    d = load_dataset(str(path))
    assert isinstance(d.x_train, ImageStore) and d.sample_shape == (3, 32, 32) and d.pixel_mean.shape == (3,)


def test_every_name_is_known():
    for name in NAMED_DATASETS:
        with pytest.raises(ValueError, match="--data-dir"):
            load_dataset(name)


# ---------------------------------------------------------------- protocol: label noise, fraction, top-k
def test_label_noise_and_train_fraction(tmp_path):
    write_cifar10(str(tmp_path), n=40)  # 200 training images
    d = load_dataset("cifar10", data_dir=str(tmp_path))
    n = len(d.y_train)
    noisy = apply_protocol(d, seed=3, label_noise=0.25)
    changed = noisy.y_train != d.y_train
    assert int(changed.sum()) == round(0.25 * n) == noisy.protocol["noisy_train_labels"]  # exactly, each to another class
    assert torch.equal(noisy.y_valid, d.y_valid) and torch.equal(noisy.y_test, d.y_test)  # training labels only
    assert torch.equal(apply_protocol(d, seed=3, label_noise=0.25).y_train, noisy.y_train)  # seeded
    assert not torch.equal(apply_protocol(d, seed=4, label_noise=0.25).y_train, noisy.y_train)
    assert int(noisy.y_train.max()) < 10 and apply_protocol(noisy, seed=3, label_noise=0.25) is noisy  # idempotent
    with pytest.raises(ValueError, match="already has the protocol"):
        apply_protocol(noisy, seed=3, label_noise=0.5)
    half = apply_protocol(d, seed=0, train_fraction=0.5, label_noise=0.1)
    counts = torch.bincount(d.y_train, minlength=10)
    assert len(half.y_train) == int(sum(max(1, round(0.5 * int(c))) for c in counts))
    assert half.protocol == {"label_noise": 0.1, "train_fraction": 0.5, "num_train_full": n,
                             "num_train": len(half.y_train), "noisy_train_labels": round(0.1 * len(half.y_train))}
    assert isinstance(half.x_train, ImageStore) and len(half.x_train) == len(half.y_train)
    only = apply_protocol(d, seed=0, train_fraction=0.5)  # stratified: half of every class
    assert torch.equal(torch.bincount(only.y_train, minlength=10),
                       torch.tensor([max(1, round(0.5 * int(c))) for c in counts]))


def test_shift_is_the_older_name_of_crop_pad():
    from ffkern.cli import build_parser

    assert build_parser().parse_args(["train", "--shift", "3"]).crop_pad == 3
    args = build_parser().parse_args(["train", "--crop-pad", "2", "--no-flip", "--randaug", "2,9"])
    assert args.crop_pad == 2 and args.flip is False and args.randaug == (2, 9)
    assert build_parser().parse_args(["train"]).flip is None  # by the data


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.5], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 3) == 1.0


def test_cli_run_on_fake_cifar10_records_protocol_and_topk(tmp_path, capsys):
    write_cifar10(str(tmp_path / "data"), n=40)
    metrics = tmp_path / "m.json"
    argv = ["train", *TINY, "--model", "vit", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
            "--topk", "5", "--label-noise", "0.2", "--train-fraction", "0.5", "--rotate", "15", "--randaug", "2,9",
            "--metrics-out", str(metrics)]
    assert main(argv) == 0, capsys.readouterr().err
    m = json.loads(metrics.read_text())
    assert 0.0 <= m["test_top5_accuracy"] <= 1.0 and m["test_top5_accuracy"] >= m["test_accuracy"]
    assert m["dataset"] == "cifar10" and m["protocol"]["label_noise"] == 0.2 and m["protocol"]["train_fraction"] == 0.5
    assert m["protocol"]["noisy_train_labels"] == round(0.2 * m["num_train"]) and m["num_train"] < m["protocol"]["num_train_full"]
    c = m["config"]
    assert c["crop_pad"] == 4 and c["flip"] is True and c["rotate"] == 15 and c["randaug"] == [2, 9]  # RGB defaults
    assert c["data_dir"] == str(tmp_path / "data")


def test_python_api_applies_the_protocol_once(tmp_path):
    write_cifar10(str(tmp_path), n=40)
    cfg = TrainConfig(dataset="cifar10", data_dir=str(tmp_path), epochs=1, width=16, depth=1, head_epochs=1,
                      backend="reference", device="cpu", label_noise=0.1, train_fraction=0.5, topk=3,
                      method="ff", ff_predict="goodness", shift=2)
    m = train(cfg, progress=False, log=lambda s: None)
    assert m["protocol"]["noisy_train_labels"] == round(0.1 * m["num_train"]) and "test_top3_accuracy" in m
    assert m["config"]["crop_pad"] == 2 and m["config"]["shift"] == 2  # shift: crop_pad's older name


def _refused(argv, capsys) -> str:
    try:
        code = main(["train", *TINY, *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("ffkern train: error: "), err
    return line


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started although the command should have been refused")

    monkeypatch.setattr("ffkern.train.trainer.train", refuse)


def test_cli_errors_are_one_line(tmp_path, capsys, no_training, monkeypatch):
    write_cifar10(str(tmp_path / "c"))
    assert "--data-dir" in _refused(["--dataset", "cifar10"], capsys)
    assert "no such folder" in _refused(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none")], capsys)
    assert "data_dir (--data-dir) is for the named datasets" in _refused(["--data-dir", str(tmp_path)], capsys)
    line = _refused(["--dataset", "mnist", "--data-dir", str(tmp_path / "c")], capsys)
    assert "--dataset: " in line and "train-images-idx3-ubyte" in line
    assert "--topk 11 is more than the 10 classes" in _refused(["--dataset", "cifar10", "--data-dir", str(tmp_path / "c"),
                                                                 "--topk", "11"], capsys)
    assert "argument --randaug" in _refused(["--randaug", "2"], capsys)
    assert "argument --randaug" in _refused(["--randaug", "2,31"], capsys)
    assert "argument --label-noise" in _refused(["--label-noise", "1.5"], capsys)
    assert "argument --train-fraction" in _refused(["--train-fraction", "0"], capsys)
    assert "argument --rotate" in _refused(["--rotate", "-1"], capsys)
    vec = tmp_path / "v.npz"
    g = np.random.default_rng(0)
    np.savez(vec, x_train=g.random((40, 1, 8, 8)), y_train=np.arange(40) % 2, x_test=g.random((6, 1, 8, 8)),
             y_test=np.arange(6) % 2)
    assert "randaug" in _refused(["--dataset", str(vec), "--randaug", "1,5"], capsys)  # float data: unknown pixel scale
    write_svhn(str(tmp_path / "s"))
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    assert "pip install scipy" in _refused(["--dataset", "svhn", "--data-dir", str(tmp_path / "s")], capsys)


@pytest.mark.parametrize("method,model", [("bp", "vit"), ("sffa", "mlp")])
def test_every_caller_of_the_inputs_takes_the_uint8_store(method, model, tmp_path):
    # bp evaluates whole splits and slices batches itself; the FF family sizes its label from the data
    write_cifar10(str(tmp_path), n=24)
    cfg = TrainConfig(dataset="cifar10", data_dir=str(tmp_path), method=method, model=model, epochs=1, width=16,
                      depth=2, head_epochs=1, backend="reference", device="cpu", topk=2, batch_size=32)
    m = train(cfg, progress=False, log=lambda s: None)
    assert 0.0 <= m["test_accuracy"] <= m["test_top2_accuracy"] <= 1.0
