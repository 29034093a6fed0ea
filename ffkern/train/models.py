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
from .cpu_linear import Linear


class RMSInput(nn.Module):
    """Scales each input row to unit root-mean-square. FF needs it between layers (Hinton 2022):
    without it a layer could pass its own goodness (the length of its output) on, and the next
    layer would be "good" without learning anything. RMS (not unit L2 length) keeps the scale of
    the next layer's goodness independent of the width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)


class TopKHalves(nn.Module):
    """SFFA's sparse layer (the authors' code, erikberter/SFFA_CoLLAS, the SFFA layer's forward):
    after the ReLU, per sample, only the ``k`` largest activations of the first half of the units
    (positive neurons) and the ``k`` largest of the second half (negative neurons) are kept, the
    others set to 0. It is part of the layer: the loss, the next layer and prediction all see the
    sparse output, and the gradient reaches the kept units only (as the authors' scatter of the
    top-k values does). Ties at the k-th value: torch.topk's pick."""

    def __init__(self, k: int, width: int):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"sffa_topk must be an int >= 1, got {k!r}")
        if width % 2 or k > width // 2:
            raise ValueError(f"sffa_topk={k} keeps k units of each half of a layer; the width {width} must be even with"
                             f" halves of at least k units")
        self.k = k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        half = h.shape[-1] // 2
        keep = torch.zeros_like(h, dtype=torch.bool)
        for start in (0, half):
            idx = h[..., start:start + half].topk(self.k, dim=-1).indices + start
            keep.scatter_(-1, idx, True)
        return h * keep

    def extra_repr(self) -> str:
        return f"k={self.k} per half"


def default_sffa_topk(method: str, model: str) -> Optional[int]:
    """SFFA's top-k (TopKHalves) by default: k = 15 of each half, as the authors' code, for
    ``--method sffa`` on the MLP (their dense layer); none elsewhere (their conv layer has it
    switched off, and they have no ViT)."""
    return SFFA_TOPK if method == "sffa" and model == "mlp" else None


SFFA_TOPK = 15


def default_label_encoding(method: str, model: str) -> str:
    """The MLP's FF label by default: SFFA's appended random patterns for ``--method sffa`` (with
    its top-k they are the authors' network: 97.9 % mean test accuracy on the digits over seeds
    0-2 against 96.7 % for the one-hot label without top-k, README), the one-hot label otherwise."""
    return "pattern" if method == "sffa" and model == "mlp" else "onehot"


def mlp_layer(in_dim: int, out_dim: int, normalize_input: bool, topk: Optional[int] = None) -> nn.Sequential:
    parts = [RMSInput()] if normalize_input else []
    sparse = [TopKHalves(topk, out_dim)] if topk is not None else []
    return nn.Sequential(*parts, Linear(in_dim, out_dim), nn.ReLU(), *sparse)


class TokenL2Norm(nn.Module):
    """Scales each sample's whole token output [B, T, D] (all T*D values, label token included)
    to unit L2 length: what the CFF code's FF and SymBa baselines on the ViT hand to the next layer
    (F.normalize of the flattened output). It starts layers 1.. of an FF-family ViT, so the
    goodness of a layer is computed on its un-normalized output, and the next layer cannot read
    that goodness off the length of its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))


class Block(nn.Module):
    """Pre-LN transformer encoder block: x + MSA(LN(x)), then x + MLP(LN(x)), MLP width 2E, GELU.
    The attention is attention.SelfAttention: nn.MultiheadAttention's weights and results with
    fewer copies (a 17% faster block step on the CPU)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(Linear(dim, 2 * dim), nn.GELU(), Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y)
        return x + self.mlp(self.norm2(x))


class PatchEmbedBlock(nn.Module):
    """The ViT's first layer in CFF: patch projection + ReLU + learned positional embedding, then
    one encoder block (the projection alone would be a layer with nothing to learn contrastively)."""

    def __init__(self, patch_dim: int, dim: int, heads: int, num_tokens: int):
        super().__init__()
        self.proj = Linear(patch_dim, dim)
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


LABEL_ENCODINGS = ("onehot", "pattern")
LABEL_PATTERN_SIZE, LABEL_PATTERN_P = 100, 0.1  # the SFFA authors' train.py: pattern_size 100, p 0.1


class MLPEncoder(Encoder):
    """MLP[E L]: L layers Linear(E) + ReLU on the flattened input. For the FF family every layer
    first scales its input to unit RMS, and the label is (``label_encoding``)
    - "onehot": one-hot in the first C input values (scaled like a bright pixel; Hinton's), or
    - "pattern": a fixed random binary pattern per class (``pattern_size`` values, each 1 with
      probability ``pattern_p``, drawn once from the seed; times the bright-pixel value) appended
      after the input, as the SFFA authors' code does (their AppendToEndOverlay); the neutral
      label appends zeros.
    ``sffa_topk`` = k adds SFFA's TopKHalves(k) after each layer's ReLU."""

    kind = "mlp"

    def __init__(self, sample_shape: Sequence[int], num_classes: int, width: int, depth: int, *,
                 label_input: bool = False, label_scale: float = 1.0, seed: int = 0, sffa_topk: Optional[int] = None,
                 label_encoding: str = "onehot", pattern_size: int = LABEL_PATTERN_SIZE,
                 pattern_p: float = LABEL_PATTERN_P):
        super().__init__(num_classes, label_input)
        self.in_dim = 1
        for s in sample_shape:
            self.in_dim *= int(s)
        if label_encoding not in LABEL_ENCODINGS:
            raise ValueError(f"label_encoding must be one of {list(LABEL_ENCODINGS)}, got {label_encoding!r}")
        self.label_encoding = label_encoding
        if label_input and label_encoding == "onehot" and num_classes > self.in_dim:
            raise ValueError(f"the FF label is one-hot in the first {num_classes} input values, but an input has only {self.in_dim}")
        self.label_scale = float(label_scale)
        self.feature_dim = width
        first_in = self.in_dim
        if label_input and label_encoding == "pattern":
            if isinstance(pattern_size, bool) or not isinstance(pattern_size, int) or pattern_size < 1:
                raise ValueError(f"pattern_size must be an int >= 1, got {pattern_size!r}")
            if not 0.0 < pattern_p <= 1.0:
                raise ValueError(f"pattern_p (the probability of a 1 in a label pattern) must be in (0, 1], got {pattern_p!r}")
            with rng.seeded(seed, rng.LABEL_TOKENS, 1):
                self.register_buffer("label_patterns", torch.bernoulli(torch.full((num_classes, pattern_size), float(pattern_p))))
            first_in += pattern_size
        for l in range(depth):
            with rng.seeded(seed, rng.INIT, l):
                self.layers.append(mlp_layer(first_in if l == 0 else width, width, normalize_input=label_input,
                                             topk=sffa_topk))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    def embed_labels(self, inp: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The label in the input (``labels=None``: the neutral label, all zeros): one-hot in the
        first C values, or its pattern appended (``label_encoding``)."""
        if self.label_encoding == "pattern":
            if labels is None:
                code = inp.new_zeros(inp.shape[0], self.label_patterns.shape[1])
            else:
                code = self.label_patterns[labels].to(inp.dtype) * self.label_scale
            return torch.cat([inp, code], 1)
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
    token 0 (seeded, not learned) and skipped by pooling and the goodness, and layers 1..L-1 start
    with TokenL2Norm (``normalize_between``, default: with the label input), as the CFF code's FF
    baseline normalizes the whole token output between layers."""

    kind = "vit"

    def __init__(self, sample_shape: Sequence[int], num_classes: int, width: int, depth: int, heads: int,
                 patch: int, *, label_input: bool = False, seed: int = 0, normalize_between: Optional[bool] = None):
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
        self.normalize_between = label_input if normalize_between is None else bool(normalize_between)
        for l in range(depth):
            with rng.seeded(seed, rng.INIT, l):
                if l == 0:
                    self.layers.append(PatchEmbedBlock(self.patch_dim, width, heads, num_tokens))
                elif self.normalize_between:  # TokenL2Norm has no parameters: the block's weights are the same
                    self.layers.append(nn.Sequential(TokenL2Norm(), Block(width, heads)))
                else:
                    self.layers.append(Block(width, heads))

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
                  norm: str = "batch", sffa_topk: Optional[int] = None, label_encoding: str = "onehot",
                  normalize_between: Optional[bool] = None) -> Encoder:
    """``width``: units (MLP) or embedding size (ViT), an int; for the conv models a float
    multiplier of the channel counts. ``norm``: the cnn's block norm, "batch" or "layer".
    MLP only: ``sffa_topk`` (SFFA's top-k per half, TopKHalves; default_sffa_topk gives the
    method's default) and ``label_encoding`` ("onehot" or SFFA's "pattern"). ViT only:
    ``normalize_between`` (TokenL2Norm between layers; None: with the FF label input)."""
    if sffa_topk is not None and kind != "mlp":
        raise ValueError(f"sffa_topk (SFFA's top-k activations per half) is a layer of the MLP, as in the SFFA"
                         f" authors' dense network (their conv layer has it switched off); model {kind!r} has none")
    if label_encoding != "onehot" and kind != "mlp":
        raise ValueError(f"label_encoding={label_encoding!r} is an input of the MLP; model {kind!r} has its own"
                         f" label input (ViT: a label token; conv models: a learned label channel)")
    if normalize_between is not None and kind != "vit":
        raise ValueError(f"normalize_between (the L2 norm of the token output between layers) is an option of the"
                         f" ViT; model {kind!r} has none")
    if kind in MODELS[2:]:
        from .conv_models import build_conv_encoder  # conv_models imports this module

        return build_conv_encoder(kind, sample_shape, num_classes, width=width, depth=depth, norm=norm,
                                  label_input=label_input, seed=seed)
    for name, v in (("width", width), ("depth", depth), ("heads", heads), ("patch_size", patch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if kind == "mlp":
        return MLPEncoder(sample_shape, num_classes, width, depth, label_input=label_input, label_scale=label_scale, seed=seed,
                          sffa_topk=sffa_topk, label_encoding=label_encoding)
    if kind == "vit":
        return ViTEncoder(sample_shape, num_classes, width, depth, heads, patch_size, label_input=label_input, seed=seed,
                          normalize_between=normalize_between)
    raise ValueError(f"model must be one of {list(MODELS)}, got {kind!r}")
