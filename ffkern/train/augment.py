"""Batched, seeded augmentations on the training device: random crop of the zero-padded image
(``shift``, the CLI's --crop-pad), horizontal flip, rotation, RandAugment-style ops, Gaussian noise.

Inputs are the standardized batch ``[B, C, H, W]`` (vectors ``[B, D]`` get the noise only). Every
op draws its per-sample parameters from the generator it is given, in a fixed order (crop, flip,
rotation, RandAugment rounds, noise), and an op that is off draws nothing: the crop-and-noise
stream of an older run is unchanged by the ops added after it, and a batch is a function of the
(seed, epoch, step) stream alone, which is what keeps the layer pipeline exact.

Ops that need pixel values (the padding colour, RandAugment's colour ops) use the dataset's
per-channel statistics ``pixel_mean``/``pixel_std`` (standardized = (pixel - mean) / std with
pixels in [0, 1]); without them the padding is 0 of the standardized input (the mean colour).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._checks import check_number

# RandAugment's ops (the 14 of the paper's list, as torchvision's RandAugment has them).
RANDAUG_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
               "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
_GEOMETRIC = range(1, 6)
# Magnitude M is on the usual 0..30 scale (31 bins); at M = 30 an op reaches these extremes.
RANDAUG_MAX_MAGNITUDE = 30
_MAX_SHEAR, _MAX_TRANSLATE, _MAX_ROTATE, _MAX_ENHANCE, _MAX_POSTERIZE_DROP = 0.3, 150 / 331, 30.0, 0.9, 4


def parse_randaug(value) -> Optional[Tuple[int, int]]:
    """``"N,M"``, ``(N, M)`` or None -> (N, M): N ops per sample (>= 1), magnitude M in 0..30."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split(",")
        try:
            value = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"randaug must be 'N,M' (ops per sample, magnitude 0..{RANDAUG_MAX_MAGNITUDE}), got {value!r}") from None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
        raise ValueError(f"randaug must be 'N,M' or a pair of ints (ops per sample, magnitude), got {value!r}")
    n, m = value
    if n < 1 or not 0 <= m <= RANDAUG_MAX_MAGNITUDE:
        raise ValueError(f"randaug N,M needs N >= 1 ops per sample and a magnitude 0 <= M <= {RANDAUG_MAX_MAGNITUDE},"
                         f" got {n},{m}")
    return int(n), int(m)


@dataclass
class Augment:
    """Per-sample random augmentations of a standardized batch (see the module docstring).

    shift: crop of the image zero-padded by ``shift`` pixels each side at a random offset (0: off).
    noise: std of additive Gaussian noise. flip: horizontal flip with probability 1/2.
    rotate: rotation by a uniform angle in [-rotate, rotate] degrees (bilinear, zero fill).
    randaug: (N, M): N ops per sample drawn uniformly from RANDAUG_OPS, magnitude M (0..30),
    each signed op with a random sign; needs ``pixel_mean``/``pixel_std``.
    """

    shift: int = 1
    noise: float = 0.1
    flip: bool = False
    rotate: float = 0.0
    randaug: Optional[Tuple[int, int]] = None
    pixel_mean: Optional[Sequence[float]] = None
    pixel_std: Optional[Sequence[float]] = None

    def __post_init__(self):
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise ValueError(f"shift must be an int >= 0, got {self.shift!r}")
        self.noise = check_number("noise", self.noise, low=0.0)
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip must be True or False, got {self.flip!r}")
        self.rotate = check_number("rotate", self.rotate, low=0.0, high=180.0)
        self.randaug = parse_randaug(self.randaug)
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ValueError("pixel_mean and pixel_std go together (both or neither)")
        if self.pixel_mean is not None:
            self.pixel_mean = torch.as_tensor(self.pixel_mean, dtype=torch.float32).reshape(-1)
            self.pixel_std = torch.as_tensor(self.pixel_std, dtype=torch.float32).reshape(-1)
            if self.pixel_mean.shape != self.pixel_std.shape or not bool((self.pixel_std > 0).all()):
                raise ValueError("pixel_mean and pixel_std need one value per channel, std > 0")
        if self.randaug is not None and self.pixel_mean is None:
            raise ValueError("randaug's colour ops work on pixel values: it needs the dataset's pixel_mean and pixel_std"
                             " (image data read from 8-bit files, or digits)")
        self._stats = {}  # device -> (mean, std, fill) shaped [1, C, 1, 1]

    @property
    def crop_pad(self) -> int:
        return self.shift

    def describe(self) -> dict:
        """The options as they ran (for the metrics JSON)."""
        return {"crop_pad": self.shift, "flip": self.flip, "rotate": self.rotate,
                "randaug": list(self.randaug) if self.randaug else None, "noise": self.noise}

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if x.dim() == 4:
            if self.shift > 0 or self.flip:
                x = self._crop_flip(x, gen)
            if self.rotate > 0:
                angle = (torch.rand(x.shape[0], generator=gen, device=x.device) * 2 - 1) * math.radians(self.rotate)
                x = self._warp(x, _rotation(angle))
            if self.randaug is not None:
                for _ in range(self.randaug[0]):
                    x = self._randaug_round(x, gen)
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return x

    # ------------------------------------------------------------ helpers
    def _channel_stats(self, x: torch.Tensor):
        """(mean, std, fill) as [1, C, 1, 1] on x's device; fill = the standardized value of a black
        pixel (what the papers' zero padding of the raw image becomes), or 0 without statistics."""
        key = (x.device, x.dtype)
        if key not in self._stats:
            c = x.shape[1]
            if self.pixel_mean is None:
                mean, std = torch.zeros(c), torch.ones(c)
                fill = torch.zeros(c)
            else:
                if self.pixel_mean.numel() != c:
                    raise ValueError(f"pixel statistics for {self.pixel_mean.numel()} channels, images have {c}")
                mean, std = self.pixel_mean, self.pixel_std
                fill = -mean / std
            shape = (1, c, 1, 1)
            self._stats[key] = tuple(t.reshape(shape).to(device=x.device, dtype=x.dtype) for t in (mean, std, fill))
        return self._stats[key]

    def _crop_flip(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One gather does both: the crop offsets pick rows and columns of the padded image, a flip
        reverses the columns."""
        b, c, h, w = x.shape
        p = self.shift
        dev = x.device
        if p > 0:
            dy = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=dev)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=dev)
        flipped = torch.rand(b, generator=gen, device=dev) < 0.5 if self.flip else None
        if p == 0:
            return torch.where(flipped[:, None, None, None], x.flip(-1), x)
        if self.pixel_mean is None:
            padded = F.pad(x, (p, p, p, p))
        else:  # padded with black: filled, then the image written in (exact, unlike pad(x - fill) + fill)
            fill = self._channel_stats(x)[2]
            padded = fill.expand(b, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = x
        cols = torch.arange(w, device=dev)
        if flipped is not None:
            cols = torch.where(flipped[:, None], cols.flip(0), cols)  # [B, W]
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # [B, 1, H, 1]
        cols = (dx[:, None] + cols)[:, None, None, :]  # [B, 1, 1, W]
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        return padded[bi, ci, rows, cols]

    def _warp(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Per-sample affine map ``matrix`` [B, 2, 3] in pixel coordinates about the image centre
        (output pixel -> source pixel), bilinear, filled with black outside the image."""
        b, c, h, w = x.shape
        # affine_grid works in [-1, 1] coordinates: conjugate by the scaling to pixels so that a
        # rotation stays a rotation on a non-square image.
        to_pix = torch.tensor([w / 2, h / 2], device=x.device, dtype=x.dtype)
        theta = matrix.to(x.dtype).clone()
        theta[:, :, :2] = theta[:, :, :2] * to_pix[None, None, :] / to_pix[None, :, None]
        theta[:, :, 2] = theta[:, :, 2] / to_pix[None, :]
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        fill = self._channel_stats(x)[2]
        return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill

    def _randaug_round(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One op per sample. Every op runs on the whole batch and each sample keeps its own op's
        result (torch.where): 14 cheap passes instead of a per-sample loop or a host sync."""
        b, dev = x.shape[0], x.device
        op = torch.randint(0, len(RANDAUG_OPS), (b,), generator=gen, device=dev)
        sign = torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, -1.0, 1.0).to(x.dtype)
        m = self.randaug[1] / RANDAUG_MAX_MAGNITUDE

        def pick(k):
            return (op == RANDAUG_OPS.index(k))[:, None, None, None]

        # geometric ops: one warp with a per-sample matrix (identity for the other ops)
        mat = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
        mat[:, 0, 0] = mat[:, 1, 1] = 1.0
        h, w = x.shape[2:]
        shear, shift = sign * _MAX_SHEAR * m, sign * _MAX_TRANSLATE * m
        o = op
        mat[:, 0, 1] = torch.where(o == 1, shear, mat[:, 0, 1])
        mat[:, 1, 0] = torch.where(o == 2, shear, mat[:, 1, 0])
        mat[:, 0, 2] = torch.where(o == 3, shift * w, mat[:, 0, 2])
        mat[:, 1, 2] = torch.where(o == 4, shift * h, mat[:, 1, 2])
        rot = _rotation(sign * math.radians(_MAX_ROTATE * m))
        mat = torch.where((o == 5)[:, None, None], rot, mat)
        geometric = ((o >= _GEOMETRIC.start) & (o < _GEOMETRIC.stop))[:, None, None, None]
        x = torch.where(geometric, self._warp(x, mat), x)

        # colour ops on pixels in [0, 1]
        mean, std, _ = self._channel_stats(x)
        p = (x * std + mean).clamp(0.0, 1.0)
        factor = (1.0 + sign * _MAX_ENHANCE * m)[:, None, None, None]
        gray = _gray(p)
        # the four enhance ops are one blend, each sample with its own degenerate image
        degenerate = torch.where(pick("brightness"), 0.0, _smooth(p))
        degenerate = torch.where(pick("color"), gray, degenerate)
        degenerate = torch.where(pick("contrast"), gray.mean((1, 2, 3), keepdim=True), degenerate)
        enhance = (o >= RANDAUG_OPS.index("brightness")) & (o <= RANDAUG_OPS.index("sharpness"))
        out = torch.where(enhance[:, None, None, None], _blend(p, degenerate, factor), p)
        out = torch.where(pick("posterize"), _posterize(p, 8 - int(_MAX_POSTERIZE_DROP * m)), out)
        out = torch.where(pick("solarize"), torch.where(p >= 1.0 - m, 1.0 - p, p), out)
        out = torch.where(pick("autocontrast"), _autocontrast(p), out)
        out = torch.where(pick("equalize"), _equalize(p), out)
        colour = (o >= 6)[:, None, None, None]
        return torch.where(colour, (out - mean) / std, x)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    """[B, 2, 3] rotation matrices (no translation) for angles in radians."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    return torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)


def _gray(p: torch.Tensor) -> torch.Tensor:
    """Luma [B, 1, H, W] (ITU-R 601 weights for RGB, the channel mean otherwise)."""
    if p.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=p.device, dtype=p.dtype)
        return (p * weights[None, :, None, None]).sum(1, keepdim=True)
    return p.mean(1, keepdim=True)


def _blend(p: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance rule: factor 1 is the image, 0 the degenerate one, > 1 extrapolates."""
    return (degenerate + factor * (p - degenerate)).clamp(0.0, 1.0)


def _smooth(p: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel (centre 5, neighbours 1, / 13) inside, the border pixels unchanged. As
    (3x3 box sum + 4 x centre) / 13 with the box from shifted slices: on a CPU three times faster
    than a depthwise conv2d or avg_pool2d (measured at 512 x 3 x 32 x 32)."""
    out = p.clone()
    if p.shape[2] > 2 and p.shape[3] > 2:
        rows = p[:, :, :-2] + p[:, :, 1:-1] + p[:, :, 2:]
        box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
        out[:, :, 1:-1, 1:-1] = (box + 4.0 * p[:, :, 1:-1, 1:-1]) / 13.0
    return out


def _posterize(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Keeps the top ``bits`` bits of each 8-bit value."""
    keep = (0xFF << (8 - bits)) & 0xFF
    v = torch.round(p * 255).to(torch.uint8)
    return torch.bitwise_and(v, keep).to(p.dtype) / 255


def _autocontrast(p: torch.Tensor) -> torch.Tensor:
    """Per sample and channel: stretches [min, max] to [0, 1] (constant channels unchanged)."""
    lo = p.amin((2, 3), keepdim=True)
    hi = p.amax((2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (p - lo) / span.clamp(min=1e-12), p)


def _equalize(p: torch.Tensor) -> torch.Tensor:
    """Histogram equalization per sample and channel on the 8-bit values, PIL's rule: the step is
    (pixels - count of the highest value present) // 255, the lookup (exclusive cumulative count +
    step // 2) // step; a channel with step 0 stays as it is. Batched with one scatter_add."""
    b, c, h, w = p.shape
    v = torch.round(p * 255).long().reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=p.device, dtype=torch.long).scatter_add_(1, v, torch.ones_like(v))
    top = hist.gather(1, v.amax(1, keepdim=True))  # count of the highest value present
    step = (h * w - top) // 255  # [B*C, 1]
    below = hist.cumsum(1) - hist
    lut = ((below + step // 2) // step.clamp(min=1)).clamp(max=255)
    out = lut.gather(1, v).to(p.dtype) / 255
    out = torch.where(step > 0, out, v.to(p.dtype) / 255)
    return out.reshape(b, c, h, w)


def make_views(x: torch.Tensor, num_views: int, augment: Augment, gen: torch.Generator) -> torch.Tensor:
    """``num_views`` independent augmentations of the batch, concatenated view-major ``[V*B, ...]``
    (row v*B + b is view v of sample b: the layout ffkern's losses take), so that a layer runs
    once on all views instead of once per view."""
    return torch.cat([augment(x, gen) for _ in range(num_views)], 0)
