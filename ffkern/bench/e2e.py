"""End-to-end: one CFF training step (SPEC 3) of ViT[128 4 5], batch 512, two views, in two ways.

paper-style  the way the CFF paper's reference code is organised: every layer runs twice, once
             per view, and its loss is plain PyTorch in the SupContrast form (N x N similarity
             matrix, mask of positives, log-softmax with the row maximum subtracted), the margin
             added to the positive similarities and clipped at 1; the ViT blocks attend with
             nn.MultiheadAttention, as a plain-PyTorch ViT does.
paper-style, ffkern blocks
             the same loop on ffkern's own blocks (train/attention.SelfAttention): what the
             trainer itself gains, apart from the faster block.
ffkern       ffkern's layer-local trainer (ffkern.train: LocalLayer / run_layers): every layer runs
             once on both views concatenated, the loss is ffkern's fused marginal SupCon.
All start from the same weights (one encoder, deep-copied; the attention modules share their
parameter names) and see the same two views of the same synthetic CIFAR-10-shaped batch
(3x32x32, 10 classes, patch 4 -> 64 tokens of 48 values; the views: random shifts of up to 4
pixels, like a padded random crop). The first step's per-layer losses are computed from identical
weights, so they must agree to rounding (to bf16 rounding with ffkern_bf16); later steps drift
apart only by rounding. Augmentation is done once, outside the timed steps. All run in fp32
unless ffkern_bf16 / ffkern_compile turn on the trainer's own speed options. On the CPU,
``cpu_heap`` (default on, as ``ffkern train`` does) keeps freed memory for reuse in the
benchmark's process (ffkern.cpu_heap): it is process-wide, so the paper-style loops get it too.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F


@dataclass
class E2EConfig:
    batch: int = 512
    width: int = 128  # E
    heads: int = 4  # H
    depth: int = 5  # L
    image: int = 32
    channels: int = 3
    patch: int = 4
    classes: int = 10
    warmup: int = 1
    steps: int = 3
    lr: float = 1e-3
    temperature: float = 0.15
    m0: float = 0.4
    mL: float = 0.1
    backend: str = "auto"
    seed: int = 0
    ffkern_bf16: bool = False  # the trainer's bf16 autocast of the layers (the paper-style loop stays fp32)
    ffkern_compile: bool = False  # the trainer's torch.compile of every layer
    cpu_heap: bool = True  # CPU: ffkern.cpu_heap.reuse_freed_cpu_memory() in this process (all loops)


def paper_style_loss(f1: torch.Tensor, f2: torch.Tensor, labels: torch.Tensor, margin: float,
                     temperature: float) -> torch.Tensor:
    """Marginal SupCon of two views in plain PyTorch, organised like the SupContrast code."""
    features = torch.cat([F.normalize(f1, dim=1), F.normalize(f2, dim=1)], 0)  # view-major [2B, D]
    n = features.shape[0]
    y = labels.repeat(2)
    not_self = 1.0 - torch.eye(n, device=features.device)
    pos = (y[:, None] == y[None, :]).float() * not_self
    sim = features @ features.T
    sim = torch.where(pos > 0, torch.clamp(sim + margin, max=1.0), sim)  # margin on positives, clipped
    logits = sim / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # stability; cancels in the loss
    log_denominator = torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    log_prob = logits - log_denominator
    mean_log_prob_pos = (pos * log_prob).sum(1) / pos.sum(1).clamp(min=1)
    return -mean_log_prob_pos.mean()


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device) -> float:
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def _timed_round_robin(steps: Dict[str, object], cfg: E2EConfig, device) -> Dict[str, List[float]]:
    """Warm-up, then timed steps of the loops in turn (a, b, c, a, b, c, ...), so that a change in
    the machine's load during the run slows all alike instead of one of them."""
    for _ in range(cfg.warmup):
        for step in steps.values():
            step()
    _sync(device)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(cfg.steps):
        for name, step in steps.items():
            times[name].append(_timed(step, device))
    return times


def with_stock_attention(layers: torch.nn.ModuleList) -> torch.nn.ModuleList:
    """A copy of the ViT layers whose attention modules are nn.MultiheadAttention
    (StockSelfAttention), loaded with the same weights."""
    from ..train.attention import SelfAttention, StockSelfAttention

    out = copy.deepcopy(layers)
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SelfAttention):
                stock = StockSelfAttention(child.dim, child.heads).to(child.in_proj_weight.device)
                stock.load_state_dict(child.state_dict())
                setattr(module, name, stock)
    return out


def run_e2e(cfg: E2EConfig, device: torch.device) -> Dict:
    from ..train import LayerBatch, Augment, build_encoder, make_local_layers, make_objective, make_views, margin_schedule, run_layers
    from .._backend import resolve

    if cfg.batch < 2 or cfg.steps < 1 or cfg.warmup < 0:
        raise ValueError(f"e2e needs batch >= 2, steps >= 1, warmup >= 0; got {cfg.batch}, {cfg.steps}, {cfg.warmup}")
    heap = False
    if cfg.cpu_heap and device.type == "cpu":
        from ..cpu_heap import reuse_freed_cpu_memory

        heap = reuse_freed_cpu_memory()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, cfg.channels, cfg.image, cfg.image, generator=gen, device=device)
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=gen, device=device)
    views = make_views(x, 2, Augment(shift=4, noise=0.0), gen)  # [2B, C, H, W], view-major

    encoder = build_encoder("vit", (cfg.channels, cfg.image, cfg.image), cfg.classes, width=cfg.width,
                            depth=cfg.depth, heads=cfg.heads, patch_size=cfg.patch, seed=cfg.seed).to(device)
    paper_layers = with_stock_attention(encoder.layers)  # same initial weights
    paper_ffkern_layers = copy.deepcopy(encoder.layers)
    margins = margin_schedule("linear", cfg.depth, cfg.m0, cfg.mL)

    # ffkern's trainer: one forward of both views per layer, fused loss, one AdamW per layer.
    objectives = [make_objective("cff", encoder, m, temperature=cfg.temperature, backend=cfg.backend) for m in margins]
    layers = make_local_layers(list(encoder.layers), objectives, lr=cfg.lr, compile=cfg.ffkern_compile,
                               autocast_dtype=torch.bfloat16 if cfg.ffkern_bf16 else None)
    tokens = encoder.prepare(views)

    def ffkern_step():
        _, stats = run_layers(layers, LayerBatch(tokens, y, 2), train=True)
        return [s.loss for s in stats]

    # Paper-style: two forwards per layer, plain PyTorch loss.
    def paper_loop(paper_layers):
        paper_opts = [torch.optim.AdamW(layer.parameters(), lr=cfg.lr) for layer in paper_layers]
        h1_first, h2_first = tokens.chunk(2)

        def paper_step():
            h1, h2, losses = h1_first, h2_first, []
            for layer, opt, m in zip(paper_layers, paper_opts, margins):
                layer.train()
                o1, o2 = layer(h1), layer(h2)
                loss = paper_style_loss(o1.mean(1), o2.mean(1), y, m, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
                h1, h2 = o1.detach(), o2.detach()
            return losses

        return paper_step

    loops = {"paper_style": paper_loop(paper_layers), "paper_style_ffkern_blocks": paper_loop(paper_ffkern_layers),
             "ffkern": ffkern_step}
    first = {name: [float(v) for v in step()] for name, step in loops.items()}  # step 0: identical weights
    times = _timed_round_robin(loops, cfg, device)
    last = {name: [float(v) for v in step()] for name, step in loops.items()}
    step_s = {name: statistics.median(t) for name, t in times.items()}
    steps_done = 2 + cfg.warmup + cfg.steps
    sides = {name: {"step_s": step_s[name], "samples_s": times[name], "first_losses": first[name],
                    "last_losses": last[name]} for name in loops}
    return {
        "config": asdict(cfg),
        "model": f"ViT[{cfg.width} {cfg.heads} {cfg.depth}]",
        "loss_backend": resolve(cfg.backend, device).name,
        **sides,
        "speedup": step_s["paper_style"] / step_s["ffkern"],
        "speedup_same_blocks": step_s["paper_style_ffkern_blocks"] / step_s["ffkern"],
        "cpu_heap_reuse": heap,
        "margins": margins,
        "first_step_max_abs_diff": max(abs(a - b) for name in ("paper_style", "paper_style_ffkern_blocks")
                                       for a, b in zip(first[name], first["ffkern"])),
        "last_step_index": steps_done - 1,
        "timing_method": f"time.perf_counter per step{' with torch.cuda.synchronize' if device.type == 'cuda' else ''}, "
                         f"median of {cfg.steps} after {cfg.warmup} warm-up, the three loops' steps in turn",
    }
