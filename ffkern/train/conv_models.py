"""Convolutional encoders as lists of blocks: the Trifecta's CNN, ResNet18 and MobileNetV3-small.

Each block is one "layer" of the layer-local trainer: backprop runs inside a block, never across
blocks (layerwise.py detaches between them). Plain torch, no torchvision.

- ``cnn`` (Dooms et al. 2023): block = [BatchNorm2d | LayerNorm([C, H, W])] -> Conv3x3 (no bias)
  -> ReLU -> MaxPool2d(2) where marked. "small" = 6 blocks, "large" = 12 (layouts below, from the
  authors' code); the channel counts times ``width``.
- ``resnet18``, ``mobilenetv3`` (Krutsylo 2025's block-wise hybrid), adapted to 32x32 inputs as
  usual for CIFAR: a stride-1 3x3 stem and no initial max-pool. Every block but the first starts by
  layer-normalizing its input over [C, H, W] (no affine), so that a block cannot pass its own
  goodness (the size of its output) on to the next: the conv analogue of the MLP's RMSInput.

The FF label (``label_input``) is a learned map, nn.Embedding(K, H*W) shaped as one extra input
channel (the Trifecta's). It travels between the data pipeline and the first block as the label
*index* in that extra channel (-1: the neutral label, a zero map), so that a batch stays one
tensor; the first block's LabelChannel looks the map up, which makes the embedding a parameter of
block 0, trained by block 0's optimizer as in the Trifecta.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import rng
from .models import Encoder

CONV_MODELS = ("cnn", "resnet18", "mobilenetv3")
NORMS = ("batch", "layer")

# (channels, max-pool after the block), from the Trifecta's code.
CNN_SMALL = ((128, True), (128, False), (256, True), (256, False), (256, False), (512, True))
CNN_LARGE = ((64, False), (128, True), (128, False), (128, False), (128, False), (256, True),
             (256, False), (256, False), (256, False), (512, True), (512, False), (512, False))
CNN_LAYOUTS = {6: CNN_SMALL, 12: CNN_LARGE}

RESNET18_STAGES = ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1))  # (out, stride)

# MobileNetV3-small bottlenecks (Howard et al. 2019, table 2): kernel, expansion, out, SE, hard-swish, stride.
# The first stride is 1 instead of 2 (with the stride-1 stem: 32x32 -> 4x4 at the end, not 1x1).
MOBILENETV3_SMALL = ((3, 16, 16, True, False, 1), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
                     (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                     (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
                     (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1))
MOBILENETV3_LAST = 576  # the final 1x1 conv, part of the last block


def default_depth(kind: str) -> int:
    return {"cnn": 6, "resnet18": len(RESNET18_STAGES), "mobilenetv3": len(MOBILENETV3_SMALL)}[kind]


def check_depth(kind: str, depth: int) -> None:
    if kind == "cnn":
        if depth not in CNN_LAYOUTS:
            raise ValueError(f"model 'cnn' has 6 blocks (the Trifecta's small network) or 12 (its large one); got"
                             f" depth (--layers) {depth}")
    elif depth != default_depth(kind):
        raise ValueError(f"model {kind!r} has {default_depth(kind)} blocks; got depth (--layers) {depth}")


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: the nearest multiple of ``divisor``, at least ``divisor`` and
    never more than 10% below ``value``."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


class MapLayerNorm(nn.Module):
    """Layer norm of each sample over [C, H, W], no affine: between blocks of the block-wise nets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm's formula written out: elementwise ops keep a channels-last map channels-last
        var, mean = torch.var_mean(x, dim=(1, 2, 3), correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + 1e-5)


class LabelChannel(nn.Module):
    """Replaces the label-index channel (the last input channel) by the label's learned map."""

    def __init__(self, num_classes: int, height: int, width: int):
        super().__init__()
        self.height, self.width = height, width
        self.embedding = nn.Embedding(num_classes, height * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image, code = x[:, :-1], x[:, -1, 0, 0]
        index = code.round().long()
        known = (index >= 0).to(image.dtype)[:, None, None, None]
        maps = self.embedding(index.clamp(min=0)).view(-1, 1, self.height, self.width).to(image.dtype)
        return torch.cat([image, maps * known], 1)


def trifecta_block(in_c: int, out_c: int, size: Tuple[int, int], pool: bool, norm: str) -> nn.Sequential:
    first = nn.BatchNorm2d(in_c) if norm == "batch" else nn.LayerNorm([in_c, *size])
    return nn.Sequential(first, nn.Conv2d(in_c, out_c, 3, padding=1, bias=False), nn.ReLU(),
                         nn.MaxPool2d(2) if pool else nn.Identity())


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convs with batch norm and the identity (or 1x1 projection) shortcut."""

    def __init__(self, in_c: int, out_c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, out_c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_c)
        self.conv2 = nn.Conv2d(out_c, out_c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_c)
        self.shortcut = nn.Identity() if stride == 1 and in_c == out_c else nn.Sequential(
            nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * F.hardsigmoid(self.expand(s))


def conv_bn_act(in_c: int, out_c: int, kernel: int, stride: int, act, groups: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(in_c, out_c, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_c), act()]


class InvertedResidual(nn.Module):
    """MobileNetV3's bottleneck: 1x1 expansion, depthwise kxk, optional squeeze-excite, 1x1 projection."""

    def __init__(self, in_c: int, kernel: int, exp_c: int, out_c: int, se: bool, hswish: bool, stride: int):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        parts: List[nn.Module] = [] if exp_c == in_c else conv_bn_act(in_c, exp_c, 1, 1, act)
        parts += conv_bn_act(exp_c, exp_c, kernel, stride, act, groups=exp_c)
        if se:
            parts.append(SqueezeExcite(exp_c, make_divisible(exp_c / 4)))
        parts += [nn.Conv2d(exp_c, out_c, 1, bias=False), nn.BatchNorm2d(out_c)]
        self.body = nn.Sequential(*parts)
        self.residual = stride == 1 and in_c == out_c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class ConvEncoder(Encoder):
    """Base of the conv encoders: image in, [B, C, H, W] per block, global average pooling."""

    channels_last = False  # set_channels_last(): NHWC maps throughout (tensor cores on a GPU)

    def __init__(self, sample_shape: Sequence[int], num_classes: int, label_input: bool):
        super().__init__(num_classes, label_input)
        if len(sample_shape) != 3:
            raise ValueError(f"the conv models need image inputs [C, H, W], got samples of shape {list(sample_shape)}")
        self.in_channels, self.height, self.width_px = (int(s) for s in sample_shape)
        self.block_channels: List[int] = []  # output channels of each block (for per-block heads)

    def first_block_input(self) -> int:
        return self.in_channels + (1 if self.label_input else 0)

    def label_parts(self) -> List[nn.Module]:
        return [LabelChannel(self.num_classes, self.height, self.width_px)] if self.label_input else []

    def set_channels_last(self, on: bool = True) -> "ConvEncoder":
        """Stores the weights and every map channels-last; the goodness losses read those maps
        without a copy either way (ffkern.feature_maps)."""
        self.channels_last = bool(on)
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self._layout(x if x.dim() == 4 else x.unsqueeze(1))

    def embed_labels(self, inp: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Appends the label-index channel (see the module docstring); None: the neutral label."""
        b = inp.shape[0]
        code = inp.new_full((b,), -1.0) if labels is None else labels.to(inp.dtype)
        return self._layout(torch.cat([inp, code[:, None, None, None].expand(b, 1, *inp.shape[2:])], 1))

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean((2, 3))


class CNNEncoder(ConvEncoder):
    """The Trifecta's network: 6 ("small") or 12 ("large") blocks; ``norm`` "batch" (default, the
    paper's) or "layer" (LayerNorm([C, H, W]) with affine, the paper's alternative)."""

    kind = "cnn"

    def __init__(self, sample_shape, num_classes: int, width: float, depth: int = 6, *, norm: str = "batch",
                 label_input: bool = False, seed: int = 0):
        super().__init__(sample_shape, num_classes, label_input)
        check_depth("cnn", depth)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
        self.norm = norm
        size, in_c = (self.height, self.width_px), self.first_block_input()
        for l, (c, pool) in enumerate(CNN_LAYOUTS[depth]):
            if pool and min(size) < 2:
                raise ValueError(f"the cnn's block {l} max-pools a {size[0]}x{size[1]} map: the images"
                                 f" ({self.height}x{self.width_px}) are too small for this layout")
            out_c = scaled(c, width)
            with rng.seeded(seed, rng.INIT, l):
                block = trifecta_block(in_c, out_c, size, pool, norm)
                self.layers.append(nn.Sequential(*self.label_parts(), *block) if l == 0 else block)
            in_c = out_c
            self.block_channels.append(out_c)
            size = (size[0] // 2, size[1] // 2) if pool else size
        self.feature_dim = in_c


class ResNet18Encoder(ConvEncoder):
    """ResNet18 for 32x32 inputs: block 0 = 3x3 stem (64) + BN + ReLU + the first basic block,
    blocks 1..7 = layer norm + one basic block (strides 2 at 128, 256, 512 channels)."""

    kind = "resnet18"

    def __init__(self, sample_shape, num_classes: int, width: float, *, label_input: bool = False, seed: int = 0):
        super().__init__(sample_shape, num_classes, label_input)
        in_c = scaled(64, width)
        for l, (c, stride) in enumerate(RESNET18_STAGES):
            out_c = scaled(c, width)
            with rng.seeded(seed, rng.INIT, l):
                if l == 0:
                    stem = [nn.Conv2d(self.first_block_input(), in_c, 3, 1, 1, bias=False), nn.BatchNorm2d(in_c), nn.ReLU()]
                    self.layers.append(nn.Sequential(*self.label_parts(), *stem, BasicBlock(in_c, out_c, stride)))
                else:
                    self.layers.append(nn.Sequential(MapLayerNorm(), BasicBlock(in_c, out_c, stride)))
            in_c = out_c
            self.block_channels.append(out_c)
        self.feature_dim = in_c


class MobileNetV3Encoder(ConvEncoder):
    """MobileNetV3-small for 32x32 inputs: block 0 = stride-1 3x3 stem (16) + the first bottleneck,
    blocks 1..10 = layer norm + one bottleneck, the last one followed by the 1x1 conv to 576."""

    kind = "mobilenetv3"

    def __init__(self, sample_shape, num_classes: int, width: float, *, label_input: bool = False, seed: int = 0):
        super().__init__(sample_shape, num_classes, label_input)
        ch = lambda c: make_divisible(c * width)  # noqa: E731
        in_c = ch(16)
        last = len(MOBILENETV3_SMALL) - 1
        for l, (k, exp_c, out_c, se, hs, stride) in enumerate(MOBILENETV3_SMALL):
            with rng.seeded(seed, rng.INIT, l):
                parts: List[nn.Module] = [MapLayerNorm()] if l else [*self.label_parts(), *conv_bn_act(
                    self.first_block_input(), in_c, 3, 1, nn.Hardswish)]
                parts.append(InvertedResidual(in_c, k, ch(exp_c), ch(out_c), se, hs, stride))
                if l == last:
                    parts += conv_bn_act(ch(out_c), ch(MOBILENETV3_LAST), 1, 1, nn.Hardswish)
                self.layers.append(nn.Sequential(*parts))
            in_c = ch(out_c)
            self.block_channels.append(ch(MOBILENETV3_LAST) if l == last else in_c)
        self.feature_dim = ch(MOBILENETV3_LAST)


def block_channels(kind: str, width: float, depth: Optional[int] = None) -> List[int]:
    """The output channels of each block of a conv model, without building it (config checks)."""
    depth = default_depth(kind) if depth is None else depth
    if kind == "cnn":
        return [scaled(c, width) for c, _ in CNN_LAYOUTS[depth]]
    if kind == "resnet18":
        return [scaled(c, width) for c, _ in RESNET18_STAGES]
    outs = [make_divisible(out_c * width) for _, _, out_c, _, _, _ in MOBILENETV3_SMALL]
    return outs[:-1] + [make_divisible(MOBILENETV3_LAST * width)]


def build_conv_encoder(kind: str, sample_shape, num_classes: int, *, width: float = 1.0, depth: Optional[int] = None,
                       norm: str = "batch", label_input: bool = False, seed: int = 0) -> ConvEncoder:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width (the channel multiplier of the conv models) must be a number > 0, got {width!r}")
    depth = default_depth(kind) if depth is None else depth
    check_depth(kind, depth)
    if kind == "cnn":
        return CNNEncoder(sample_shape, num_classes, width, depth, norm=norm, label_input=label_input, seed=seed)
    if kind == "resnet18":
        return ResNet18Encoder(sample_shape, num_classes, width, label_input=label_input, seed=seed)
    if kind == "mobilenetv3":
        return MobileNetV3Encoder(sample_shape, num_classes, width, label_input=label_input, seed=seed)
    raise ValueError(f"conv model must be one of {list(CONV_MODELS)}, got {kind!r}")
