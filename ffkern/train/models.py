"""Encoders given as a list of layers: MLP[E L] and ViT[E H L] of the CFF paper.

An encoder turns a raw batch into the first layer's input (``prepare``), optionally embeds a label
for the FF family (``embed_labels``), and pools a layer's output into the features the loss sees
(``pool``: identity for the MLP, token mean for the ViT). Each layer is built under its own seeded
RNG stream, so a process that builds only some of the layers gets the same weights.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from . import rng
from .attention import SelfAttention


class RMSInput(nn.Module):
    """Scales each input row to unit root-mean-square. FF needs it between layers (Hinton 2022):
    without it a layer could pass its own goodness (the length of its output) on, and the next
    layer would be "good" without learning anything. RMS (not unit L2 length) keeps the scale of
    the next layer's goodness independent of the width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)


def mlp_layer(in_dim: int, out_dim: int, normalize_input: bool) -> nn.Sequential:
    parts = [RMSInput()] if normalize_input else []
    return nn.Sequential(*parts, nn.Linear(in_dim, out_dim), nn.ReLU())


class Block(nn.Module):
    """Pre-LN transformer encoder block: x + MSA(LN(x)), then x + MLP(LN(x)), MLP width 2E, GELU.
    The attention is attention.SelfAttention: nn.MultiheadAttention's weights and results with
    fewer copies (a 17% faster block step on the CPU)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y)
        return x + self.mlp(self.norm2(x))


class PatchEmbedBlock(nn.Module):
    """The ViT's first layer in CFF: patch projection + ReLU + learned positional embedding, then
    one encoder block (the projection alone would be a layer with nothing to learn contrastively)."""

    def __init__(self, patch_dim: int, dim: int, heads: int, num_tokens: int):
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, num_tokens, dim))
        self.block = Block(dim, heads)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.proj(patches)) + self.pos)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p], patches in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


class Encoder(nn.Module):
    """Base: ``layers`` (an nn.ModuleList) plus the input and pooling conventions."""

    kind = "encoder"
    skip_tokens = 0  # tokens of a layer's output that are not image content (FF label token)

    def __init__(self, num_classes: int, label_input: bool):
        super().__init__()
        self.num_classes = num_classes
        self.label_input = label_input
        self.layers = nn.ModuleList()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_labels(self, inp: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """End to end: the pooled output of the last layer (for BP and for evaluation)."""
        h = self.prepare(x)
        if self.label_input:
            h = self.embed_labels(h, labels)
        for layer in self.layers:
            h = layer(h)
        return self.pool(h)


class MLPEncoder(Encoder):
    """MLP[E L]: L layers Linear(E) + ReLU on the flattened input. For the FF family the label is
    one-hot in the first C input values (scaled like a bright pixel) and every layer first scales
    its input to unit RMS."""

    kind = "mlp"

    def __init__(self, sample_shape: Sequence[int], num_classes: int, width: int, depth: int, *,
                 label_input: bool = False, label_scale: float = 1.0, seed: int = 0):
        super().__init__(num_classes, label_input)
        self.in_dim = 1
        for s in sample_shape:
            self.in_dim *= int(s)
        if label_input and num_classes > self.in_dim:
            raise ValueError(f"the FF label is one-hot in the first {num_classes} input values, but an input has only {self.in_dim}")
        self.label_scale = float(label_scale)
        self.feature_dim = width
        for l in range(depth):
            with rng.seeded(seed, rng.INIT, l):
                self.layers.append(mlp_layer(self.in_dim if l == 0 else width, width, normalize_input=label_input))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    def embed_labels(self, inp: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """One-hot label (all zeros for ``labels=None``: the neutral label) in the first C values."""
        out = inp.clone()
        out[:, :self.num_classes] = 0.0
        if labels is not None:
            out[torch.arange(len(labels), device=inp.device), labels] = self.label_scale
        return out

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        return h


class ViTEncoder(Encoder):
    """ViT[E H L]: layer 0 = patch projection + ReLU + positional embedding + block, layers 1..L-1
    = blocks; pooling = token mean. For the FF family a fixed random label patch is prepended as
    token 0 (seeded, not learned) and skipped by pooling and the goodness."""

    kind = "vit"

    def __init__(self, sample_shape: Sequence[int], num_classes: int, width: int, depth: int, heads: int,
                 patch: int, *, label_input: bool = False, seed: int = 0):
        super().__init__(num_classes, label_input)
        if len(sample_shape) != 3:
            raise ValueError(f"the ViT needs image inputs [C, H, W], got samples of shape {list(sample_shape)}")
        c, h, w = (int(s) for s in sample_shape)
        if h % patch or w % patch:
            raise ValueError(f"patch_size={patch} must divide the image size {h}x{w}")
        if width % heads:
            raise ValueError(f"the width E={width} must be divisible by the number of heads H={heads}")
        self.patch, self.patch_dim, self.feature_dim = patch, c * patch * patch, width
        self.skip_tokens = 1 if label_input else 0
        num_tokens = (h // patch) * (w // patch) + self.skip_tokens
        with rng.seeded(seed, rng.LABEL_TOKENS):
            self.register_buffer("label_tokens", torch.randn(num_classes, self.patch_dim))
        for l in range(depth):
            with rng.seeded(seed, rng.INIT, l):
                self.layers.append(PatchEmbedBlock(self.patch_dim, width, heads, num_tokens) if l == 0 else Block(width, heads))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.patch)

    def embed_labels(self, inp: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Prepends the label's fixed random patch (zeros for ``labels=None``: the neutral label)."""
        if labels is None:
            token = inp.new_zeros(inp.shape[0], 1, inp.shape[2])
        else:
            token = self.label_tokens[labels].to(inp.dtype)[:, None, :]
        return torch.cat([token, inp], 1)

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, self.skip_tokens:].mean(1)


MODELS = ("mlp", "vit", "cnn", "resnet18", "mobilenetv3")  # the last three: conv_models.CONV_MODELS


def build_encoder(kind: str, sample_shape, num_classes: int, *, width, depth: int, heads: int = 4,
                  patch_size: int = 2, label_input: bool = False, label_scale: float = 1.0, seed: int = 0,
                  norm: str = "batch") -> Encoder:
    """``width``: units (MLP) or embedding size (ViT), an int; for the conv models a float
    multiplier of the channel counts. ``norm``: the cnn's block norm, "batch" or "layer"."""
    if kind in MODELS[2:]:
        from .conv_models import build_conv_encoder  # conv_models imports this module

        return build_conv_encoder(kind, sample_shape, num_classes, width=width, depth=depth, norm=norm,
                                  label_input=label_input, seed=seed)
    for name, v in (("width", width), ("depth", depth), ("heads", heads), ("patch_size", patch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if kind == "mlp":
        return MLPEncoder(sample_shape, num_classes, width, depth, label_input=label_input, label_scale=label_scale, seed=seed)
    if kind == "vit":
        return ViTEncoder(sample_shape, num_classes, width, depth, heads, patch_size, label_input=label_input, seed=seed)
    raise ValueError(f"model must be one of {list(MODELS)}, got {kind!r}")
