"""Batched augmentations (ffkern/train/augment.py): the crop-and-noise stream of older runs is
unchanged, flips / crops / rotations are what they say, RandAugment's ops match Pillow's on 8-bit
images, each sample gets its own op, everything is seeded by the stream it is given."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffkern.train import rng
from ffkern.train.augment import (RANDAUG_OPS, Augment, _autocontrast, _blend, _equalize, _gray, _posterize, _rotation,
                                  _smooth, make_views, parse_randaug)
from ffkern.train.data import Dataset
from ffkern.train.trainer import TrainConfig, build_augment

from PIL import Image, ImageEnhance, ImageOps  # the test extra installs Pillow: the ops are compared with its


def old_augment(x, gen, shift, noise):
    """The augmentation as it was before this module (crop of the zero-padded image, then noise):
    kept here to prove that old runs draw the same numbers."""
    if x.dim() == 4 and shift > 0:
        b, c, h, w = x.shape
        p = shift
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x


@pytest.mark.parametrize("shift,noise", [(0, 0.2), (1, 0.2), (4, 0.0), (2, 0.5)])
def test_old_stream_is_unchanged(shift, noise):
    x = torch.randn(5, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    new = Augment(shift, noise)(x, rng.generator(1, rng.AUGMENT, 2, 3))
    assert torch.equal(new, old_augment(x, rng.generator(1, rng.AUGMENT, 2, 3), shift, noise))
    views = make_views(x, 2, Augment(shift, noise), rng.generator(4, 1))
    g = rng.generator(4, 1)
    assert torch.equal(views, torch.cat([old_augment(x, g, shift, noise), old_augment(x, g, shift, noise)]))


def test_flip_and_crop():
    x = torch.arange(64 * 1 * 5 * 5, dtype=torch.float32).reshape(64, 1, 5, 5)
    out = Augment(shift=0, noise=0.0, flip=True)(x, rng.generator(0, 1))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54  # each is one or the other, about half flipped
    out = Augment(shift=2, noise=0.0, flip=True)(x, rng.generator(0, 2))
    padded = F.pad(x, (2, 2, 2, 2))
    for b in range(8):  # every sample: one of the 25 crops of its padded image, or of the flipped one
        crops = [padded[b, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        crops += [c.flip(-1) for c in crops]
        assert any(torch.equal(out[b], c) for c in crops)


def test_crop_pads_with_black_when_the_pixel_scale_is_known():
    mean, std = torch.tensor([0.5, 0.25]), torch.tensor([0.2, 0.1])
    x = torch.full((16, 2, 4, 4), 3.0)
    out = Augment(shift=4, noise=0.0, pixel_mean=mean, pixel_std=std)(x, rng.generator(0, 1))
    black = (-mean / std)[None, :, None, None].expand_as(out)
    assert torch.equal(torch.where(out == 3.0, black, out), black)  # every pixel is the image's or black
    assert bool((out != 3.0).any())


def test_rotation():
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    aug = Augment(shift=0, noise=0.0)
    quarter = aug._warp(x, _rotation(torch.full((3,), np.pi / 2)))
    assert torch.allclose(quarter, torch.rot90(x, 1, (2, 3)), atol=1e-5) or \
        torch.allclose(quarter, torch.rot90(x, -1, (2, 3)), atol=1e-5)
    assert torch.allclose(aug._warp(x, _rotation(torch.zeros(3))), x, atol=1e-6)
    out = Augment(shift=0, noise=0.0, rotate=15)(x, rng.generator(0, 5))
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.allclose(out, x)
    assert torch.equal(out, Augment(shift=0, noise=0.0, rotate=15)(x, rng.generator(0, 5)))  # seeded
    # a non-square image: a half turn is exact too (the aspect ratio is accounted for)
    r = torch.randn(2, 1, 4, 8)
    assert torch.allclose(aug._warp(r, _rotation(torch.full((2,), np.pi))), r.flip(-1).flip(-2), atol=1e-5)


def _pil(p):  # [C, H, W] in [0, 1] -> PIL RGB
    return Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _back(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


def test_colour_ops_match_pillow():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (4, 3, 9, 11), generator=g).float() / 255
    imgs[1] = torch.round((imgs[1] * 0.5 + 0.2) * 255) / 255  # low contrast (8-bit values): autocontrast has work
    for i, p in enumerate(imgs):
        im = _pil(p)
        b = p[None]
        assert torch.equal(_posterize(b, 5)[0], _back(ImageOps.posterize(im, 5)))
        assert torch.allclose(_equalize(b)[0], _back(ImageOps.equalize(im)), atol=1e-6)
        assert torch.allclose(_autocontrast(b)[0], _back(ImageOps.autocontrast(im)), atol=1.5 / 255)  # Pillow truncates
        for f in (0.3, 1.7):
            t = torch.tensor(f).reshape(1, 1, 1, 1)
            # Pillow rounds each blend to 8 bits (and its degenerate images too): within 2/255
            assert torch.allclose(_blend(b, torch.zeros_like(b), t)[0], _back(ImageEnhance.Brightness(im).enhance(f)), atol=2 / 255)
            assert torch.allclose(_blend(b, _gray(b).expand_as(b), t)[0], _back(ImageEnhance.Color(im).enhance(f)), atol=2 / 255)
            mean = _gray(b).mean((1, 2, 3), keepdim=True).expand_as(b)
            assert torch.allclose(_blend(b, mean, t)[0], _back(ImageEnhance.Contrast(im).enhance(f)), atol=2 / 255)
            assert torch.allclose(_blend(b, _smooth(b), t)[0], _back(ImageEnhance.Sharpness(im).enhance(f)), atol=2 / 255)


def _expected_op(name, p, sign, m):
    """One sample's op, from the single-image helpers (pixels [C, H, W] in [0, 1])."""
    b, f = p[None], torch.tensor(1.0 + sign * 0.9 * m).reshape(1, 1, 1, 1)
    return {
        "brightness": lambda: _blend(b, torch.zeros_like(b), f),
        "color": lambda: _blend(b, _gray(b).expand_as(b), f),
        "contrast": lambda: _blend(b, _gray(b).mean((1, 2, 3), keepdim=True).expand_as(b), f),
        "sharpness": lambda: _blend(b, _smooth(b), f),
        "posterize": lambda: _posterize(b, 8 - int(4 * m)),
        "solarize": lambda: torch.where(b >= 1.0 - m, 1.0 - b, b),
        "autocontrast": lambda: _autocontrast(b),
        "equalize": lambda: _equalize(b),
        "identity": lambda: b,
    }[name]()[0]


def test_randaug_gives_each_sample_its_own_op():
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    pix = torch.randint(0, 256, (64, 3, 8, 8), generator=torch.Generator().manual_seed(3)).float() / 255
    x = (pix - mean[:, None, None]) / std[:, None, None]
    m_level = 12
    aug = Augment(shift=0, noise=0.0, randaug=(1, m_level), pixel_mean=mean, pixel_std=std)
    out = aug(x, rng.generator(0, 9))
    g = rng.generator(0, 9)  # the same draws, in the module's order
    op = torch.randint(0, len(RANDAUG_OPS), (64,), generator=g)
    sign = torch.where(torch.rand(64, generator=g) < 0.5, -1.0, 1.0)
    m = m_level / 30
    seen = set()
    for i in range(64):
        name = RANDAUG_OPS[int(op[i])]
        seen.add(name)
        got = out[i] * std[:, None, None] + mean[:, None, None]
        if name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
            assert got.shape == pix[i].shape and torch.isfinite(got).all()
            continue
        assert torch.allclose(got, _expected_op(name, pix[i], float(sign[i]), m), atol=1e-5), name
    assert len(seen) >= 12  # 64 draws from 14 ops
    # geometric ops move pixels: a translated image is the original shifted (whole pixels here)
    tx = Augment(shift=0, noise=0.0, randaug=(2, 30), pixel_mean=mean, pixel_std=std)
    a, b = tx(x, rng.generator(1, 1)), tx(x, rng.generator(1, 1))
    assert torch.equal(a, b) and not torch.equal(a, tx(x, rng.generator(1, 2)))


def test_views_are_independent_and_seeded():
    x = torch.zeros(6, 3, 8, 8)
    aug = Augment(shift=2, noise=0.1, flip=True, rotate=10, randaug=(2, 9), pixel_mean=[0.5] * 3, pixel_std=[0.25] * 3)
    v = make_views(x, 2, aug, rng.generator(5, 1, 0, 0))
    assert v.shape == (12, 3, 8, 8) and torch.isfinite(v).all()
    assert torch.equal(v, make_views(x, 2, aug, rng.generator(5, 1, 0, 0)))
    assert not torch.equal(v[:6], v[6:])
    vec = Augment(shift=3, noise=0.0, flip=True, rotate=20)(torch.ones(4, 6), rng.generator(0, 1))
    assert torch.equal(vec, torch.ones(4, 6))  # vectors: noise only


def test_arguments_and_defaults():
    with pytest.raises(ValueError, match="pixel_mean"):
        Augment(randaug=(2, 9))
    with pytest.raises(ValueError, match="rotate"):
        Augment(rotate=200)
    with pytest.raises(ValueError, match="flip"):
        Augment(flip=1)
    assert parse_randaug("2,9") == (2, 9) and parse_randaug(None) is None
    for bad in ("2", "0,5", "2,31", "a,b", (1, 2, 3)):
        with pytest.raises(ValueError, match="randaug"):
            parse_randaug(bad)
    rgb = Dataset("rgb", torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), torch.zeros(2, 3, 32, 32),
                  torch.zeros(2, dtype=torch.long), torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), 2)
    gray = Dataset("gray", torch.zeros(4, 1, 28, 28), rgb.y_train, torch.zeros(2, 1, 28, 28), rgb.y_valid,
                   torch.zeros(2, 1, 28, 28), rgb.y_test, 2)
    small = Dataset("small", torch.zeros(4, 1, 8, 8), rgb.y_train, torch.zeros(2, 1, 8, 8), rgb.y_valid,
                    torch.zeros(2, 1, 8, 8), rgb.y_test, 2)
    cfg = TrainConfig().resolved()
    a = build_augment(cfg, rgb)
    assert a.flip and a.crop_pad == 4  # CIFAR/SVHN-style RGB: crop 4 and flip
    a = build_augment(cfg, gray)
    assert not a.flip and a.crop_pad == 3  # MNIST-style: no flip
    a = build_augment(cfg, small)
    assert not a.flip and a.crop_pad == 0 and a.rotate == 0 and a.randaug is None  # digits: as before
    a = build_augment(TrainConfig(shift=1, flip=True).resolved(), small)
    assert a.crop_pad == 1 and a.flip
    with pytest.raises(ValueError, match="disagree"):
        TrainConfig(shift=1, crop_pad=2).resolved()
    assert TrainConfig(crop_pad=2).resolved().shift == 2
