"""Per-layer diagnostics over epochs (SPEC 1.4), the metrics JSON, the end table and the plot."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import torch

from .._atomic import atomic_write
from .layerwise import StepStats

SPLITS = ("train", "valid")


class History:
    """Per layer and epoch: sample-weighted mean loss and clipped-positive fraction, train/valid.

    Steps are accumulated as tensors and reduced once per epoch (one device sync per epoch).
    The clipped fraction of an epoch is the sample-weighted mean over batches where it is defined
    (a batch with no positive pair has none); it is None for methods without margin clipping."""

    def __init__(self, names: Sequence[str], margins: Optional[Sequence[Optional[float]]] = None):
        self.names = list(names)
        self.margins = list(margins) if margins is not None else [None] * len(self.names)
        self.layers: List[Dict[str, list]] = [
            {f"{s}_{k}": [] for s in SPLITS for k in ("loss", "clipped_fraction")} for _ in self.names
        ]
        self._pending: Dict = {}

    def add(self, split: str, layer: int, st: StepStats) -> None:
        self._pending.setdefault((split, layer), []).append(st)

    def end_epoch(self) -> None:
        for l in range(len(self.names)):
            for split in SPLITS:
                steps = self._pending.get((split, l), [])
                rec = self.layers[l]
                if not steps:
                    rec[f"{split}_loss"].append(None)
                    rec[f"{split}_clipped_fraction"].append(None)
                    continue
                w = torch.tensor([float(s.samples) for s in steps])
                loss = torch.stack([s.loss.float().cpu() for s in steps])
                rec[f"{split}_loss"].append(float((loss * w).sum() / w.sum()))
                if steps[0].clipped_fraction is None:
                    rec[f"{split}_clipped_fraction"].append(None)
                else:
                    frac = torch.stack([s.clipped_fraction.double().cpu() for s in steps])
                    ok = ~torch.isnan(frac)
                    rec[f"{split}_clipped_fraction"].append(float((frac[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else None)
        self._pending = {}

    @property
    def epochs(self) -> int:
        return len(self.layers[0]["train_loss"]) if self.layers else 0

    def last(self, layer: int, key: str):
        values = self.layers[layer][key]
        return values[-1] if values else None

    @classmethod
    def from_json(cls, layers: Sequence[Dict]) -> "History":
        """The inverse of to_json (e.g. to plot a metrics file)."""
        hist = cls([rec["name"] for rec in layers], [rec.get("margin") for rec in layers])
        for l, rec in enumerate(layers):
            for key in hist.layers[l]:
                hist.layers[l][key] = list(rec[key])
        return hist

    def to_json(self) -> List[Dict]:
        return [{"layer": l, "name": n, "margin": m, **rec}
                for l, (n, m, rec) in enumerate(zip(self.names, self.margins, self.layers))]


def _clean(obj):
    """JSON has no NaN/inf: they become null (never a made-up number)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_metrics(path: str, metrics: Dict) -> None:
    """The metrics JSON, written atomically (its folder is created if missing)."""

    def write(f):
        json.dump(_clean(metrics), f, indent=2, allow_nan=False)
        f.write("\n")

    atomic_write(path, write)


def plot_format(path: str) -> str:
    """The file format of a plot path: its extension, which must be one that matplotlib can
    write here. Checked before training (``ffkern train --plot``), so that a run is not lost at
    its end; raises ValueError saying why not."""
    ext = os.path.splitext(path)[1][1:].lower()
    try:
        import matplotlib
    except ImportError:
        raise ValueError("drawing a plot needs matplotlib: pip install matplotlib (or ffkern[train])") from None
    matplotlib.use("Agg", force=True)  # files only: never needs a display
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if ext not in formats:
        raise ValueError(f"{path}: the file name must end in an extension matplotlib writes: {', '.join('.' + f for f in formats)}")
    problem = _cannot_draw(ext)
    if problem:
        raise ValueError(f"{path}: matplotlib cannot write .{ext} files here: {problem}")
    return ext


def _cannot_draw(ext: str) -> Optional[str]:
    """Draws a tiny figure with text in format ``ext`` into memory: some listed formats need more
    than matplotlib (.pgf needs a LaTeX install, .avif a Pillow plugin) and fail only then."""
    import io

    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    try:
        fig.add_subplot().set_title("probe")
        fig.savefig(io.BytesIO(), format=ext)
    except Exception as exc:  # noqa: BLE001 - any failure of this probe means "cannot write"; its message is shown
        return f"{type(exc).__name__}: {exc}"
    finally:
        plt.close(fig)
    return None


def _fmt(v, spec=".4f"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_table(history: History) -> str:
    """The end-of-run per-layer table (final epoch)."""
    header = ["layer", "margin", "train loss", "valid loss", "train clipped", "valid clipped"]
    rows = [header]
    for l, name in enumerate(history.names):
        rows.append([name, _fmt(history.margins[l], ".3f"), _fmt(history.last(l, "train_loss")), _fmt(history.last(l, "valid_loss")),
                     _fmt(history.last(l, "train_clipped_fraction"), ".3f"), _fmt(history.last(l, "valid_clipped_fraction"), ".3f")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_history(path: str, history: History, title: str = "") -> None:
    """Per-layer loss (train solid, valid dashed) and, where the method has one, the
    clipped-positive fraction over epochs, in the format of the path's extension (PNG for .png),
    written atomically."""
    fmt = plot_format(path)
    import matplotlib.pyplot as plt

    has_clip = any(v is not None for rec in history.layers for v in rec["train_clipped_fraction"])
    fig, axes = plt.subplots(1, 2 if has_clip else 1, figsize=(11 if has_clip else 6, 4), squeeze=False)
    epochs = list(range(1, history.epochs + 1))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for l, name in enumerate(history.names):
        c = colors[l % len(colors)]
        if history.margins[l] is not None:
            name = f"{name} (m={history.margins[l]:.2f})"
        for split, style in (("train", "-"), ("valid", "--")):
            y = [float("nan") if v is None else v for v in history.layers[l][f"{split}_loss"]]
            axes[0][0].plot(epochs, y, style, color=c, label=f"{name} {split}")
            if has_clip:
                y = [float("nan") if v is None else v for v in history.layers[l][f"{split}_clipped_fraction"]]
                axes[0][1].plot(epochs, y, style, color=c, label=f"{name} {split}")
    axes[0][0].set(xlabel="epoch", ylabel="loss", title="per-layer loss")
    axes[0][0].legend(fontsize=7)
    if has_clip:
        axes[0][1].set(xlabel="epoch", ylabel="fraction", title="positives clipped by the margin (s + m >= 1)")
        axes[0][1].legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=100), binary=True)
    finally:
        plt.close(fig)
