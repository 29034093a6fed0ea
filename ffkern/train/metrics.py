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
    """Per layer and epoch: sample-weighted mean loss and clipped-positive fraction, train/valid,
    and (when recorded with ``add_fisher``) the Fisher criterion of the validation features;
    per layer at the end (``set_probe``): the linear probe's accuracy and the Fisher criterion
    (probe.py, SPEC 1.4).

    Steps are accumulated as tensors and reduced once per epoch (one device sync per epoch).
    The clipped fraction of an epoch is the sample-weighted mean over batches where it is defined
    (a batch with no positive pair has none); it is None for methods without margin clipping."""

    def __init__(self, names: Sequence[str], margins: Optional[Sequence[Optional[float]]] = None):
        self.names = list(names)
        self.margins = list(margins) if margins is not None else [None] * len(self.names)
        self.layers: List[Dict[str, list]] = [
            {**{f"{s}_{k}": [] for s in SPLITS for k in ("loss", "clipped_fraction")}, "valid_fisher": []}
            for _ in self.names
        ]
        self.probe: List[Dict[str, Optional[float]]] = [{} for _ in self.names]  # keys: probe.PROBE_KEYS
        self._pending: Dict = {}
        self._pending_fisher: Optional[List[Optional[float]]] = None

    def add(self, split: str, layer: int, st: StepStats) -> None:
        self._pending.setdefault((split, layer), []).append(st)

    def add_fisher(self, values: Sequence[Optional[float]]) -> None:
        """This epoch's Fisher criterion of the validation features, one value per layer
        (probe.layer_fisher); an epoch without it records None."""
        if len(values) != len(self.names):
            raise ValueError(f"add_fisher needs one value per layer ({len(self.names)}), got {len(values)}")
        self._pending_fisher = [None if v is None else float(v) for v in values]

    def set_probe(self, results: Sequence[Dict[str, float]]) -> None:
        """The end-of-run per-layer results of probe.probe_layers (one dict per layer of this
        history; for the BP baseline's single "end-to-end" entry, the last layer's)."""
        if len(results) != len(self.names):
            raise ValueError(f"set_probe needs one result per layer ({len(self.names)}), got {len(results)}")
        self.probe = [{k: (None if v is None else float(v)) for k, v in r.items()} for r in results]

    def end_epoch(self) -> None:
        for l in range(len(self.names)):
            self.layers[l]["valid_fisher"].append(None if self._pending_fisher is None else self._pending_fisher[l])
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
        self._pending_fisher = None

    @property
    def epochs(self) -> int:
        return len(self.layers[0]["train_loss"]) if self.layers else 0

    def last(self, layer: int, key: str):
        """The last epoch's value of a per-epoch key, or an end-of-run probe key's value."""
        if key in self.probe[layer] or key.startswith("probe_"):
            return self.probe[layer].get(key)
        values = self.layers[layer][key]
        return values[-1] if values else None

    @classmethod
    def from_json(cls, layers: Sequence[Dict]) -> "History":
        """The inverse of to_json (e.g. to plot a metrics file). Files written before a key
        existed (valid_fisher, the probe keys) read as None for it."""
        hist = cls([rec["name"] for rec in layers], [rec.get("margin") for rec in layers])
        for l, rec in enumerate(layers):
            epochs = len(rec["train_loss"])
            for key in hist.layers[l]:
                hist.layers[l][key] = list(rec[key]) if key in rec else [None] * epochs
            hist.probe[l] = {k: v for k, v in rec.items() if k.startswith("probe_")}
        return hist

    def to_json(self) -> List[Dict]:
        return [{"layer": l, "name": n, "margin": m, **rec, **probe}
                for l, (n, m, rec, probe) in enumerate(zip(self.names, self.margins, self.layers, self.probe))]


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


def _pct(v):
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


CLIPPED_NOTE = ("clipped: the fraction of an anchor's positive pairs whose similarity plus the margin reached 1"
                " (s + m >= 1), which pass no gradient (SPEC 1.3, 1.4)")
PROBE_NOTE = ("probe: accuracy of a linear classifier on the layer's pooled features; Fisher: tr(between-class scatter)"
              " / tr(within-class scatter) of those features, L2-normalized (SPEC 1.4)")

# (header, value of layer l, format): a column is shown only when some layer has a value in it.
_COLUMNS = (
    ("margin", lambda h, l: h.margins[l], lambda v: _fmt(v, ".3f")),
    ("train loss", lambda h, l: h.last(l, "train_loss"), _fmt),
    ("valid loss", lambda h, l: h.last(l, "valid_loss"), _fmt),
    ("train clipped", lambda h, l: h.last(l, "train_clipped_fraction"), lambda v: _fmt(v, ".3f")),
    ("valid clipped", lambda h, l: h.last(l, "valid_clipped_fraction"), lambda v: _fmt(v, ".3f")),
    ("probe valid", lambda h, l: h.last(l, "probe_valid_accuracy"), _pct),
    ("probe test", lambda h, l: h.last(l, "probe_test_accuracy"), _pct),
    ("Fisher valid", lambda h, l: _fisher_end(h, l, "valid"), lambda v: _fmt(v, "#.3g")),
    ("Fisher test", lambda h, l: h.last(l, "probe_test_fisher"), lambda v: _fmt(v, "#.3g")),
)


def _fisher_end(history: "History", layer: int, split: str):
    """The end-of-run Fisher criterion of a split: the probe's, else the last epoch's (valid)."""
    v = history.last(layer, f"probe_{split}_fisher")
    return history.last(layer, "valid_fisher") if v is None and split == "valid" else v


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def format_table(history: History) -> str:
    """The end-of-run per-layer table (final epoch): only the columns the method has (no margin
    or clipped fraction for the FF family, probe and Fisher columns when they were computed),
    then one line explaining each kind of column that needs it."""
    columns = [c for c in _COLUMNS if any(_present(c[1](history, l)) for l in range(len(history.names)))]
    rows = [["layer"] + [c[0] for c in columns]]
    for l, name in enumerate(history.names):
        rows.append([name] + [fmt(value(history, l)) for _, value, fmt in columns])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    headers = {c[0] for c in columns}
    if headers & {"train clipped", "valid clipped"}:
        lines.append(CLIPPED_NOTE)
    if headers & {"probe valid", "probe test", "Fisher valid", "Fisher test"}:
        lines.append(PROBE_NOTE)
    return "\n".join(lines)


def _series(values, epochs: int):
    """A per-epoch list as floats with NaN for None, or None when it has no value (or does not
    cover the epochs, e.g. a history built by hand)."""
    if len(values) != epochs or not any(_present(v) for v in values):
        return None
    return [float("nan") if v is None else v for v in values]


def plot_history(path: str, history: History, title: str = "") -> None:
    """Per-layer curves over epochs: the loss (train solid, valid dashed), where the method has
    one the clipped-positive fraction, and where recorded the validation Fisher criterion; then,
    when the run was probed, one panel per layer index at the end: the linear probe's accuracy
    (valid, test) and the Fisher criterion (right axis). In the format of the path's extension
    (PNG for .png), written atomically."""
    fmt = plot_format(path)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(history.names)
    epochs = list(range(1, history.epochs + 1))
    has_clip = any(_series(history.layers[l][f"{s}_clipped_fraction"], len(epochs)) for l in range(n) for s in SPLITS)
    has_fisher = any(_series(history.layers[l]["valid_fisher"], len(epochs)) for l in range(n))
    has_probe = any(_present(history.last(l, k)) for l in range(n)
                    for k in ("probe_valid_accuracy", "probe_test_accuracy", "probe_valid_fisher", "probe_test_fisher"))
    panels = 1 + has_clip + has_fisher + has_probe
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    ax_loss = axes.pop(0)
    ax_clip = axes.pop(0) if has_clip else None
    ax_fisher = axes.pop(0) if has_fisher else None
    ax_probe = axes.pop(0) if has_probe else None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for l, name in enumerate(history.names):
        c = colors[l % len(colors)]
        if history.margins[l] is not None:
            name = f"{name} (m={history.margins[l]:.2f})"
        for split, style in (("train", "-"), ("valid", "--")):
            y = [float("nan") if v is None else v for v in history.layers[l][f"{split}_loss"]]
            ax_loss.plot(epochs, y, style, color=c, label=f"{name} {split}")
            y = _series(history.layers[l][f"{split}_clipped_fraction"], len(epochs)) if has_clip else None
            if y is not None:
                ax_clip.plot(epochs, y, style, color=c, label=f"{name} {split}")
        y = _series(history.layers[l]["valid_fisher"], len(epochs)) if has_fisher else None
        if y is not None:
            ax_fisher.plot(epochs, y, "--", color=c, label=f"{name} valid")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="per-layer loss")
    per_epoch = [ax_loss]
    if has_clip:
        ax_clip.set(xlabel="epoch", ylabel="fraction", title="positives clipped by the margin (s + m >= 1)")
        per_epoch.append(ax_clip)
    if has_fisher:
        ax_fisher.set(xlabel="epoch", ylabel="tr(S_B) / tr(S_W)", title="Fisher criterion, validation features")
        per_epoch.append(ax_fisher)
    for ax in per_epoch:
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if has_probe:
        _plot_probe(ax_probe, history)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=100), binary=True)
    finally:
        plt.close(fig)


def _plot_probe(ax, history: History) -> None:
    """Per layer at the end: probe accuracy (left axis, %) and Fisher criterion (right axis)."""
    from matplotlib.ticker import MaxNLocator

    x = list(range(len(history.names)))

    def values(key):
        return [float("nan") if not _present(history.last(l, key)) else history.last(l, key) for l in x]

    lines = []
    for key, style, label in (("probe_valid_accuracy", "o-", "probe accuracy, valid"),
                              ("probe_test_accuracy", "s-", "probe accuracy, test")):
        y = values(key)
        if any(math.isfinite(v) for v in y):
            lines += ax.plot(x, [100 * v for v in y], style, color="C0" if "valid" in key else "C1", label=label)
    ax.set(xlabel="layer", ylabel="accuracy (%)", title="per layer at the end")
    ax.set_xticks(x, history.names, fontsize=7)
    right = ax.twinx()
    for key, style, label in (("probe_valid_fisher", "o--", "Fisher, valid"), ("probe_test_fisher", "s--", "Fisher, test")):
        y = values(key)
        if any(math.isfinite(v) for v in y):
            lines += right.plot(x, y, style, color="C2" if "valid" in key else "C3", label=label)
    right.set_ylabel("tr(S_B) / tr(S_W)")
    right.yaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7)
