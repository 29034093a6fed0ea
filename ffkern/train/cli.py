"""``ffkern train``: the command a new user runs first (registered by ffkern/cli.py)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

# Only argparse here: torch and the trainer load when the command runs (ffkern/cli.py's rule).
_METHODS = ("cff", "ff", "symba", "sffa", "bp")
_SCHEDULES = ("linear", "parabolic", "cosine", "exponential", "constant")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="layer-local CFF / FF training (default: CFF on an MLP, bundled digits)",
        description="Layer-local training with ffkern's losses. Defaults give the good run: CFF (marginal "
                    "SupCon, margins 0.4 -> 0.1) on MLP[500 3] with scikit-learn's bundled digits.")
    p.add_argument("--method", choices=_METHODS, default="cff", help="training algorithm (default: cff; bp: the end-to-end cross-entropy baseline)")
    p.add_argument("--model", choices=("mlp", "vit"), default="mlp", help="MLP[E L] or ViT[E H L] (default: mlp)")
    p.add_argument("--dataset", default="digits", help="'digits' (default) or a .npz with x_train, y_train, x_test, y_test")
    p.add_argument("--epochs", type=int, default=None, help="stage-1 epochs (default: per method and model)")
    p.add_argument("--batch-size", type=int, default=128, help="default: 128")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the weights and every random draw (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--metrics-out", metavar="FILE.json", default=None, help="write the metrics JSON here")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="draw per-layer loss and clipped fraction")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, default=None, help="E: units per MLP layer / ViT embedding size (default: 500 MLP, 64 ViT)")
    g.add_argument("--layers", dest="depth", type=int, default=None, help="L: number of layers (default: 3)")
    g.add_argument("--heads", type=int, default=4, help="H: ViT attention heads")
    g.add_argument("--patch-size", type=int, default=None, help="ViT patch side (default: image side / 4)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate of every layer (default: per method and model)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--views", type=int, choices=(1, 2), default=2, help="CFF views per batch (default: 2; 1: one-forward mode)")
    g.add_argument("--shift", type=int, default=None,
                   help="augmentation: max random shift in pixels, 0: off (default: 0 below 16x16 images, else side/8)")
    g.add_argument("--noise", type=float, default=0.2, help="augmentation: Gaussian noise std on standardized inputs (0: off)")
    g.add_argument("--head-epochs", type=int, default=30, help="stage-2 linear head epochs (default: 30)")
    g.add_argument("--head-lr", type=float, default=1e-2, help="default: 0.01")
    g = p.add_argument_group("losses")
    g.add_argument("--temperature", type=float, default=0.15, help="CFF temperature tau (default: 0.15)")
    g.add_argument("--margin-schedule", dest="schedule", choices=_SCHEDULES, default="linear",
                   help="per-layer margins from m0 to mL (default: linear)")
    g.add_argument("--m0", type=float, default=0.4, help="margin of the first layer (default: 0.4)")
    g.add_argument("--mL", type=float, default=0.1, help="margin of the last layer (default: 0.1)")
    g.add_argument("--threshold", type=float, default=2.0, help="FF goodness threshold theta (default: 2.0)")
    g.add_argument("--alpha", type=float, default=4.0, help="SymBa alpha (default: 4.0)")
    g.add_argument("--ff-predict", choices=("goodness", "head"), default="goodness",
                   help="FF family: try every label (goodness, default) or a linear head on the neutral-label features")
    g.add_argument("--backend", default="auto", help="ffkern loss backend: auto (default), reference, triton or cpp")
    g = p.add_argument_group("speed")
    g.add_argument("--pipeline", action="store_true",
                   help="layer pipeline over the processes of torchrun (torchrun --nproc_per_node=R -m ffkern train"
                        " --pipeline): rank r trains a contiguous group of layers; same result as without it")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the layers (GPU only; default off)")
    g.add_argument("--compile", action="store_true", help="torch.compile every layer (default off)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy shared machine)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .metrics import plot_history, write_metrics
    from .trainer import TrainConfig, train

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    config = TrainConfig(**{k: getattr(args, k) for k in names if hasattr(args, k)})
    try:  # a bad option or dataset is the user's input: a one-line error, exit status 2 (as argparse does)
        resolved = config.resolved()
        if args.pipeline:
            from .pipeline import check_pipeline, world_size_from_env

            check_pipeline(resolved, world_size_from_env())  # every rank refuses alike, before any talks
        data = load_dataset(config.dataset, config.seed, config.valid_fraction)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"ffkern train: error: {exc}", file=sys.stderr)
        return 2
    if args.pipeline:
        from .pipeline import train_pipeline

        metrics = train_pipeline(config, progress=not args.no_progress, data=data)
        if metrics is None:  # ranks > 0: rank 0 reports and writes the files
            return 0
    else:
        metrics = train(config, progress=not args.no_progress, data=data)
    if args.metrics_out:
        write_metrics(args.metrics_out, metrics)
        print(f"metrics written to {args.metrics_out}")
    if args.plot:
        from .metrics import History

        history = History.from_json(metrics["layers"])
        title = f"{metrics['method']} on {metrics['model']}, {metrics['dataset']}: test accuracy {100 * metrics['test_accuracy']:.2f}%"
        plot_history(args.plot, history, title)
        print(f"plot written to {args.plot}")
    return 0
