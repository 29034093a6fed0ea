"""Data loading (digits, .npz), seeded splits and batches, two-view augmentations."""
import numpy as np
import pytest
import torch

from ffkern.train import rng
from ffkern.train.data import Augment, DatasetError, batches, load_dataset, load_digits, load_npz, make_views

pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn")


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def test_digits_split(digits):
    n = len(digits.y_train) + len(digits.y_valid) + len(digits.y_test)
    assert n == 1797 and digits.num_classes == 10
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.is_image
    assert len(digits.y_test) == pytest.approx(0.2 * 1797, abs=10)
    assert len(digits.y_valid) == pytest.approx(0.1 * (1797 - len(digits.y_test)), abs=10)
    # stratified: every class in every split
    for y in (digits.y_train, digits.y_valid, digits.y_test):
        assert torch.unique(y).tolist() == list(range(10))
    # standardized with training statistics
    assert abs(float(digits.x_train.mean())) < 1e-4 and abs(float(digits.x_train.std()) - 1) < 1e-3
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64


def test_digits_pixel_statistics(digits):
    # the augmentations pad with black and RandAugment works on pixels: both need the statistics
    # the standardization used; a black pixel is the digits' background, their smallest value
    assert digits.pixel_mean.shape == (1,) and digits.pixel_std.shape == (1,)
    black = float(-digits.pixel_mean[0] / digits.pixel_std[0])
    assert float(digits.x_train.min()) == pytest.approx(black, abs=1e-5)


def test_digits_split_is_seeded(digits):
    again = load_digits(seed=0)
    other = load_digits(seed=1)
    assert torch.equal(again.y_test, digits.y_test) and torch.equal(again.x_train, digits.x_train)
    assert not torch.equal(other.x_test, digits.x_test)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_images_channels_first(tmp_path):
    g = np.random.default_rng(0)
    path = _write(tmp_path / "d.npz", x_train=g.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8),
                  y_train=np.arange(50) % 5, x_test=g.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8),
                  y_test=np.arange(20) % 5)
    d = load_dataset(path, seed=0, valid_fraction=0.2)
    assert d.name == "d.npz" and d.num_classes == 5
    assert d.x_train.shape[1:] == (3, 8, 8) and len(d.y_train) + len(d.y_valid) == 50 and len(d.y_valid) == 10
    assert len(d.y_test) == 20 and torch.isfinite(d.x_test).all()


def test_npz_channels_last_and_vectors(tmp_path):
    g = np.random.default_rng(1)
    p1 = _write(tmp_path / "hwc.npz", x_train=g.random((30, 16, 16, 3)).astype(np.float32), y_train=np.arange(30) % 3,
                x_test=g.random((6, 16, 16, 3)).astype(np.float32), y_test=np.arange(6) % 3)
    assert load_npz(p1).x_train.shape[1:] == (3, 16, 16)  # channels-last arrays become [N, C, H, W]
    p2 = _write(tmp_path / "vec.npz", x_train=g.random((30, 7)), y_train=np.arange(30) % 3,
                x_test=g.random((6, 7)), y_test=np.arange(6) % 3)
    d = load_npz(p2)
    assert d.x_train.shape[1:] == (7,) and not d.is_image


def test_npz_errors(tmp_path):
    g = np.random.default_rng(2)
    ok = dict(x_train=g.random((10, 4)), y_train=np.arange(10) % 2, x_test=g.random((4, 4)), y_test=np.arange(4) % 2)
    with pytest.raises(ValueError, match="missing arrays"):
        load_npz(_write(tmp_path / "a.npz", x_train=ok["x_train"], y_train=ok["y_train"]))
    with pytest.raises(ValueError, match="y_train"):
        load_npz(_write(tmp_path / "b.npz", **{**ok, "y_train": np.arange(10) * 0.5}))
    with pytest.raises(ValueError, match="labels but the inputs"):
        load_npz(_write(tmp_path / "c.npz", **{**ok, "y_test": np.arange(3)}))
    with pytest.raises(ValueError, match="x_test samples"):
        load_npz(_write(tmp_path / "d.npz", **{**ok, "x_test": g.random((4, 5))}))
    with pytest.raises(ValueError, match="NaN"):
        load_npz(_write(tmp_path / "e.npz", **{**ok, "x_train": np.full((10, 4), np.nan)}))
    with pytest.raises(FileNotFoundError):
        load_npz(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("cifar10")


def test_batches_cover_each_sample_once_and_are_seeded():
    parts = list(batches(10, 4, seed=3, epoch=1))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert torch.equal(torch.cat(parts), torch.cat(list(batches(10, 4, seed=3, epoch=1))))
    assert not torch.equal(torch.cat(parts), torch.cat(list(batches(10, 4, seed=3, epoch=2))))


def test_shift_is_a_crop_of_the_zero_padded_image():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    out = Augment(shift=2, noise=0.0)(x, rng.generator(0, 1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):  # each sample is one of the 25 crops of its padded image
        crops = [padded[b, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[b], c) for c in crops)
    assert torch.equal(Augment(shift=0, noise=0.0)(x, rng.generator(0, 1)), x)


def test_noise_and_views_are_seeded_and_view_major():
    x = torch.zeros(3, 1, 4, 4)
    aug = Augment(shift=1, noise=0.5)
    v = make_views(x, 2, aug, rng.generator(5, 1, 0, 0))
    assert v.shape == (6, 1, 4, 4)
    assert torch.equal(v, make_views(x, 2, aug, rng.generator(5, 1, 0, 0)))  # same stream, same views
    assert not torch.equal(v[:3], v[3:])  # two independent augmentations
    assert float(v.std()) == pytest.approx(0.5, rel=0.5)
    vec = Augment(shift=3, noise=0.0)(torch.ones(4, 6), rng.generator(0, 1))
    assert torch.equal(vec, torch.ones(4, 6))  # vectors: no shift


def test_augment_arguments():
    with pytest.raises(ValueError, match="shift"):
        Augment(shift=-1)
    with pytest.raises(ValueError, match="noise"):
        Augment(noise=-0.1)


def test_labels_of_any_integer_value_are_remapped(tmp_path):
    # Used as indices, 2**40 would size the head and FF's label embedding to 2**40 classes.
    g = np.random.default_rng(3)
    big = 2 ** 40
    ids = np.array([-1, 7, big])  # negative, sparse and huge: classes 0, 1, 2 in increasing order
    path = _write(tmp_path / "ids.npz", x_train=g.random((30, 4)), y_train=ids[np.arange(30) % 3],
                  x_test=g.random((6, 4)), y_test=ids[[2, 1, 0, 2, 1, 0]])
    d = load_npz(path)
    assert d.num_classes == 3
    y = torch.cat([d.y_train, d.y_valid])
    assert sorted(torch.unique(y).tolist()) == [0, 1, 2] and d.y_test.tolist() == [2, 1, 0, 2, 1, 0]
    assert len(y) == 30 and all(int((y == c).sum()) == 10 for c in range(3))  # one index per value, none merged


def test_labels_that_are_already_classes_keep_their_values(tmp_path):
    from ffkern.train.data import remap_labels

    y_train, y_test, values = remap_labels(np.array([2, 0, 1, 2]), np.array([1, 0]))
    assert y_train.tolist() == [2, 0, 1, 2] and y_test.tolist() == [1, 0] and values.tolist() == [0, 1, 2]
    y_train, y_test, values = remap_labels(np.array([2 ** 40, 5]), np.array([5]))  # a value only in one split still maps
    assert y_train.tolist() == [1, 0] and y_test.tolist() == [0] and values.tolist() == [5, 2 ** 40]


def test_uint64_labels_beyond_int64_are_refused(tmp_path):
    g = np.random.default_rng(4)
    y = np.array([0, 2 ** 63 + 5], dtype=np.uint64)[np.arange(20) % 2]
    path = _write(tmp_path / "u.npz", x_train=g.random((20, 4)), y_train=y, x_test=g.random((2, 4)), y_test=y[:2])
    with pytest.raises(DatasetError, match=r"u\.npz: y_train has labels above 2\*\*63"):
        load_npz(path)


def test_validation_split_too_small_is_refused(tmp_path):
    g = np.random.default_rng(5)
    # 5 samples per class: 10 % of 5 rounds to 0 for every class, so no validation sample at all
    path = _write(tmp_path / "few.npz", x_train=g.random((10, 4)), y_train=np.arange(10) % 2,
                  x_test=g.random((2, 4)), y_test=np.arange(2))
    with pytest.raises(DatasetError, match="few.npz: too few training samples for the validation split.*at least 6"):
        load_npz(path)
    path = _write(tmp_path / "enough.npz", x_train=g.random((12, 4)), y_train=np.arange(12) % 2,
                  x_test=g.random((2, 4)), y_test=np.arange(2))
    assert len(load_npz(path).y_valid) == 2  # 6 per class: one each


def _good_npz(tmp_path, compressed=False):
    g = np.random.default_rng(6)
    path = tmp_path / ("c.npz" if compressed else "g.npz")
    (np.savez_compressed if compressed else np.savez)(path, x_train=g.random((40, 8)), y_train=np.arange(40) % 2,
                                                      x_test=g.random((6, 8)), y_test=np.arange(6) % 2)
    return path


@pytest.mark.parametrize("kind", ["empty", "text", "npy", "pickle", "truncated", "damaged_member", "damaged_compressed",
                                  "folder"])
def test_unusable_files_raise_dataset_error_naming_them(kind, tmp_path):
    path = tmp_path / "bad.npz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not numbers")
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.arange(3))
    elif kind == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"x_train": [1, 2]}))
    elif kind == "truncated":
        data = _good_npz(tmp_path).read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind in ("damaged_member", "damaged_compressed"):  # the zip directory is intact, an array's bytes are not
        data = bytearray(_good_npz(tmp_path, compressed=kind == "damaged_compressed").read_bytes())
        start = data.index(b"x_train.npy") + 200
        data[start:start + 64] = bytes(64)
        path.write_bytes(bytes(data))
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(DatasetError, match=str(path).replace(".", r"\.")):
        load_dataset(str(path))


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_dataset(str(tmp_path / "none.npz"))
