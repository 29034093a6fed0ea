"""``ffkern train``: the command a new user runs first (registered by ffkern/cli.py)."""
from __future__ import annotations

import argparse
import dataclasses
import os

from .._cliargs import UsageError, as_usage_error, int_at_least, layer_spec, output_dir, output_file, real

# Only argparse here: torch and the trainer load when the command runs (ffkern/cli.py's rule).
_METHODS = ("cff", "ff", "symba", "sffa", "sff", "bp")
_MODELS = ("mlp", "vit", "cnn", "resnet18", "mobilenetv3")  # models.MODELS
_SCHEDULES = ("linear", "parabolic", "cosine", "exponential", "constant")
# The type= of each option checks its value while parsing (ranges as in TrainConfig.resolved,
# which checks them again for callers of the Python API).
_POSITIVE, _COUNT = int_at_least(1), int_at_least(0)
_RATE, _NONNEG, _MARGIN = real(0.0, low_open=True), real(0.0), real(0.0, 2.0)
_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "folder")  # data.NAMED_DATASETS


def _randaug(text: str):
    """argparse type of --randaug N,M."""
    parts = text.split(",")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,M (ops per sample, magnitude 0..30), e.g. 2,9; got {text!r}") from None
    if n < 1 or not 0 <= m <= 30:
        raise argparse.ArgumentTypeError(f"needs N >= 1 and 0 <= M <= 30, got {text}")
    return n, m


_randaug.__name__ = "N,M"


def _width(text: str):
    """argparse type of --width: an int (MLP units, ViT embedding size) or, for the conv models, a
    float channel multiplier such as 0.25 (TrainConfig.resolved checks which the model takes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return int(value) if value.is_integer() and "." not in text else value


_width.__name__ = "number"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="layer-local CFF / FF training (default: CFF on an MLP, bundled digits)",
        description="Layer-local training with ffkern's losses. Defaults give the good run: CFF (marginal "
                    "SupCon, margins 0.4 -> 0.1) on MLP[500 3] with scikit-learn's bundled digits.")
    p.add_argument("--method", choices=_METHODS, default="cff",
                   help="training algorithm (default: cff; sff: Scalable FF's per-class conv loss, conv models only;"
                        " bp: the end-to-end cross-entropy baseline)")
    p.add_argument("--model", choices=_MODELS, default="mlp",
                   help="MLP[E L], ViT[E H L], the Trifecta's cnn, or the block-wise resnet18 / mobilenetv3 (small)"
                        " (default: mlp)")
    p.add_argument("--dataset", default="digits",
                   help="'digits' (default), a .npz with x_train, y_train, x_test, y_test, or one of "
                        f"{', '.join(_DATASETS)} read from the published files in --data-dir")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="the folder with the named dataset's files as published: IDX files (mnist, fashion-mnist),"
                        " cifar-10-batches-py/ or cifar-10-python.tar.gz (and CIFAR-100's), train_32x32.mat and"
                        " test_32x32.mat (svhn), train/<class>/*.png and test/<class>/... (folder)")
    p.add_argument("--epochs", type=_POSITIVE, default=None, help="stage-1 epochs (default: per method and model)")
    p.add_argument("--batch-size", type=_POSITIVE, default=128, help="default: 128")
    p.add_argument("--seed", type=_COUNT, default=0, help="seeds the split, the weights and every random draw (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--metrics-out", metavar="FILE.json", type=output_file, default=None, help="write the metrics JSON here")
    p.add_argument("--plot", metavar="FILE.png", type=output_file, default=None,
                   help="draw per-layer loss and clipped fraction (format from the extension: .png, .pdf, .svg, ...)")
    p.add_argument("--save", metavar="DIR", type=output_dir, default=None,
                   help="save the run in DIR: a checkpoint after every epoch (encoder, objectives, optimizers, history),"
                        " then the head, config.json and metrics.json (resume with --resume DIR, evaluate with ffkern eval)")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run saved in DIR exactly, with its options (only --epochs, to extend it, --threads"
                        " and --data-dir may be given anew; any other option that differs is refused); saves on in DIR")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=_width, default=None,
                   help="E: units per MLP layer / ViT embedding size (default: 500 MLP, 64 ViT); conv models: a channel"
                        " multiplier (default: 0.25 cnn and resnet18, 0.5 mobilenetv3)")
    g.add_argument("--layers", type=_POSITIVE, default=None,
                   help="L: number of layers (default: 3); cnn: 6 (the Trifecta's small network, default) or 12 (large)")
    g.add_argument("--norm", choices=("batch", "layer"), default="batch",
                   help="cnn: the norm at the start of each block, BatchNorm2d over positives and negatives together"
                        " (default, the Trifecta's) or LayerNorm([C, H, W])")
    g.add_argument("--heads", type=_POSITIVE, default=4, help="H: ViT attention heads")
    g.add_argument("--patch-size", type=_POSITIVE, default=None, help="ViT patch side (default: image side / 4)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=_RATE, default=None, help="AdamW learning rate of every layer (default: per method and model)")
    g.add_argument("--weight-decay", type=_NONNEG, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--views", type=int, choices=(1, 2), default=2, help="CFF views per batch (default: 2; 1: one-forward mode)")
    g.add_argument("--head-epochs", type=_POSITIVE, default=30, help="stage-2 linear head epochs (default: 30)")
    g.add_argument("--head-lr", type=_RATE, default=1e-2, help="default: 0.01")
    g = p.add_argument_group("augmentation (on the device, per sample; two independent views for cff)")
    g.add_argument("--crop-pad", "--shift", dest="crop_pad", type=_COUNT, default=None, metavar="PIXELS",
                   help="random crop of the image zero-padded this much each side, 0: off (default: 0 below 16x16"
                        " images, else side/8, 4 for 32x32); --shift is its older name")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on for RGB images, off for one channel: digits, MNIST)")
    g.add_argument("--rotate", type=real(0.0, 180.0), default=0.0, metavar="DEG",
                   help="random rotation in [-DEG, DEG] degrees (default 0: off; the Trifecta uses 15)")
    g.add_argument("--randaug", type=_randaug, default=None, metavar="N,M",
                   help="RandAugment: N random ops per sample at magnitude M of 30, e.g. 2,9 (default: off)")
    g.add_argument("--noise", type=_NONNEG, default=0.2, help="Gaussian noise std on standardized inputs (0: off)")
    g = p.add_argument_group("protocol")
    g.add_argument("--label-noise", type=real(0.0, 1.0), default=0.0, metavar="P",
                   help="give this fraction of the training labels a uniformly random other class (seeded; default 0)")
    g.add_argument("--train-fraction", type=real(0.0, 1.0, low_open=True), default=1.0, metavar="F",
                   help="train on a seeded stratified fraction F of the training split (default 1)")
    g.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="per layer: the Fisher criterion of the pooled validation features every epoch (CFF Fig. 5) and,"
                        " at the end, a linear probe's valid/test accuracy (metrics and table; default on)")
    g.add_argument("--topk", type=_POSITIVE, default=None, metavar="K",
                   help="also report the top-K test accuracy (metrics: test_topK_accuracy)")
    g = p.add_argument_group("losses")
    g.add_argument("--temperature", type=_RATE, default=0.15, help="CFF temperature tau (default: 0.15)")
    g.add_argument("--margin-schedule", choices=_SCHEDULES, default="linear",
                   help="per-layer margins from m0 to mL (default: linear)")
    g.add_argument("--m0", type=_MARGIN, default=0.4, help="margin of the first layer (default: 0.4)")
    g.add_argument("--mL", type=_MARGIN, default=0.1, help="margin of the last layer (default: 0.1)")
    g.add_argument("--k", type=_RATE, default=1.0,
                   help="CFF's schedule exponent k of the parabolic, cosine and exponential margins (default: 1)")
    g.add_argument("--threshold", type=real(), default=2.0, help="FF goodness threshold theta (default: 2.0)")
    g.add_argument("--alpha", type=_RATE, default=4.0, help="SymBa alpha (default: 4.0)")
    g.add_argument("--olu", action="store_true",
                   help="overlapping local updates (the Trifecta): on even steps blocks (0,1), (2,3), ... are trained"
                        " together by the second one's loss, on odd steps (embedding,0), (1,2), ...")
    g.add_argument("--class-scale", type=_RATE, default=1.0,
                   help="sff: initial value of each block's learned scale of the class goodness (default: 1)")
    g.add_argument("--select-encoder", choices=("best-valid", "last"), default="best-valid",
                   help="the stage-1 encoder that prediction uses: that of the epoch with the lowest validation loss of"
                        " the last layer (best-valid, default, as CFF) or of the last epoch")
    g.add_argument("--ff-predict", choices=("goodness", "head"), default="goodness",
                   help="FF family: try every label (goodness, default) or a linear head on the neutral-label features;"
                        " sff: the class goodness averaged over blocks (goodness) or a linear head on the last block")
    g.add_argument("--ff-predict-layers", type=layer_spec, default="all", metavar="LAYERS",
                   help="--ff-predict goodness: the layers whose goodness is summed (sff: whose class goodness is"
                        " averaged): all (default), last (the Trifecta's and the CFF code's), first, an index (-1), a"
                        " slice (1:, :-1) or a list (0,2)")
    g.add_argument("--sffa-topk", type=_COUNT, default=None, metavar="K",
                   help="sffa on the MLP: keep the K largest activations of each half of a layer after the ReLU"
                        " (default 15, as the authors' code; 0: off)")
    g.add_argument("--ff-label", choices=("onehot", "pattern"), default=None,
                   help="the MLP's FF label: one-hot in the first inputs, or SFFA's fixed random binary patterns appended"
                        " to the input (default: pattern for sffa, onehot otherwise)")
    g.add_argument("--sffa-activity", action=argparse.BooleanOptionalAction, default=None,
                   help="sffa: multiply the loss by the authors' activity factor 1 + exp(-10 (mean h+ + mean h-))"
                        " (default on for mlp, cnn, resnet18, whose layers end in a ReLU; off for the others)")
    g.add_argument("--vit-l2", action=argparse.BooleanOptionalAction, default=None,
                   help="FF family on the ViT: L2-normalize the whole token output between layers, as the CFF code's"
                        " FF baseline (default on)")
    g.add_argument("--backend", default="auto", help="ffkern loss backend: auto (default), reference, triton or cpp")
    g = p.add_argument_group("speed")
    g.add_argument("--pipeline", action="store_true",
                   help="layer pipeline over the processes of torchrun (torchrun --nproc_per_node=R -m ffkern train"
                        " --pipeline): rank r trains a contiguous group of layers; same result as without it")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the layers (GPU only; default off)")
    g.add_argument("--compile", action="store_true", help="torch.compile every layer (default off)")
    g.add_argument("--channels-last", action="store_true",
                   help="conv models: weights and maps channels-last (NHWC; faster convolutions on a GPU; default off)")
    g.add_argument("--threads", type=_POSITIVE, default=None,
                   help="torch CPU threads (default: the cores other processes leave idle, by the load average, at most"
                        " torch's choice; OMP_NUM_THREADS, when set, is kept)")
    g.add_argument("--cpu-heap", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU runs: keep freed memory for reuse, so that large activations are not fresh pages each step"
                        " (glibc; up to 1.5x faster steps measured; the process keeps its peak memory; default on)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--recipe", choices=recipe_names(), default=None,
                   help="set every option of one seed paper's run (list: ffkern recipes); options after it override it")
    p.set_defaults(func=run, train_parser=p)
    e = subparsers.add_parser("eval", help="evaluate a run saved by ffkern train --save on a dataset, without training",
                              description="Test (and validation) accuracy of the run saved in DIR: its selected encoder"
                                          " and its head, on its own dataset or another of the same shape and classes.")
    e.add_argument("folder", metavar="DIR", help="the folder ffkern train --save DIR wrote")
    e.add_argument("--dataset", default=None, help="default: the run's own dataset; else as for ffkern train")
    e.add_argument("--data-dir", metavar="DIR", default=None, help="the named dataset's folder (as for ffkern train)")
    e.add_argument("--topk", type=_POSITIVE, default=None, metavar="K", help="also report the top-K test accuracy")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    e.add_argument("--metrics-out", metavar="FILE.json", type=output_file, default=None, help="write the results JSON here")
    e.set_defaults(func=run_eval)
    r = subparsers.add_parser("recipes", help="the seed papers' runs by name, with the accuracy each paper reports",
                              description="The seed papers' runs: ffkern train --recipe NAME --data-dir DIR.")
    r.set_defaults(func=_print_recipes)
    return p


def recipe_names():
    from .recipes import names

    return names()


def _print_recipes(args: argparse.Namespace) -> int:
    from .recipes import table

    print(table())
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, evaluate
    from .data import MissingDependency

    with as_usage_error(ValueError, FileNotFoundError, MissingDependency, CheckpointError):
        result = evaluate(args.folder, dataset=args.dataset, data_dir=args.data_dir, topk=args.topk, device=args.device)
    if args.metrics_out:
        from .metrics import write_metrics

        write_metrics(args.metrics_out, result)
        print(f"results written to {args.metrics_out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from .trainer import train

    config, data = prepare(args)
    save = args.save if args.save is not None else args.resume
    if args.pipeline:
        from .pipeline import train_pipeline

        metrics = train_pipeline(config, progress=not args.no_progress, data=data)
        if metrics is None:  # ranks > 0: rank 0 reports and writes the files
            return 0
    else:
        metrics = train(config, progress=not args.no_progress, data=data, save=save, resume=args.resume)
    if args.recipe:
        from .recipes import RECIPES

        metrics["recipe"] = {"name": args.recipe, "paper": RECIPES[args.recipe].paper,
                             "reported": RECIPES[args.recipe].reported}
    write_outputs(args, metrics)
    return 0


def prepare(args: argparse.Namespace):
    """Every check of the user's input, before any work (a run must not fail at its end on
    something known at its start): the options, the output files, the device, the dataset and
    its fit with the model, the loss backend. Raises UsageError; returns (config, dataset)."""
    from .._backend import BackendUnavailable, resolve
    from .data import MissingDependency, apply_protocol, load_dataset
    from .trainer import TrainConfig, build_augment, check_compatible, check_device_options, pick_device

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    config = TrainConfig(**{k: getattr(args, k) for k in names if hasattr(args, k)})
    check_output_options(args)
    if args.pipeline and (args.save or args.resume):
        raise UsageError("--save and --resume are not offered with --pipeline yet; drop one of them")
    saved = None
    if args.resume is not None:
        config, saved = resumed_config(args, names)
    with as_usage_error():  # these functions raise ValueError for bad input, naming it
        cfg = config.resolved()
        if args.save is not None:
            from .trainer import check_save_folder

            check_save_folder(args.save, args.resume)
        if args.pipeline:
            from .pipeline import check_pipeline, world_size_from_env

            check_pipeline(cfg, world_size_from_env())  # every rank refuses alike, before any talks
        device = pick_device(cfg.device)
        check_device_options(cfg, device)
    with as_usage_error(ValueError, FileNotFoundError, MissingDependency, prefix="--dataset: "):
        data = load_dataset(cfg.dataset, cfg.seed, cfg.valid_fraction, data_dir=cfg.data_dir)
    with as_usage_error():
        data = apply_protocol(data, seed=cfg.seed, label_noise=cfg.label_noise, train_fraction=cfg.train_fraction)
        if cfg.topk is not None and cfg.topk > data.num_classes:
            raise UsageError(f"--topk {cfg.topk} is more than the {data.num_classes} classes of dataset {data.name}")
        check_compatible(cfg, data)
        build_augment(cfg, data)  # e.g. --randaug on data of unknown pixel scale
        if saved is not None:
            from .trainer import check_resume

            check_resume(cfg, saved, data, args.resume)
    # Last: "auto" may build the C++ backend on first use (a minute), not worth it for a run
    # that is refused anyway.
    with as_usage_error(ValueError, BackendUnavailable, prefix=f"--backend {cfg.backend}: "):
        resolve(cfg.backend, device)
        if cfg.method == "sff":  # the per-class loss needs its own kernel (or the reference)
            from .trainer import per_class_backend

            per_class_backend(cfg.backend, device)
    return config, data


def given_options(args: argparse.Namespace) -> set:
    """The dests of the options the user gave on the command line (a recipe's count as given):
    the train parser is run again on the same arguments with every default suppressed. Without
    the arguments (a Namespace built in Python), the options whose value is not the default."""
    parser, argv = getattr(args, "train_parser", None), getattr(args, "argv", None)
    if parser is None or argv is None:
        parser = parser or _fresh_train_parser()
        return {a.dest for a in parser._actions if a.dest != "help" and getattr(args, a.dest, None) != a.default}
    defaults = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in defaults:
            a.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for a, d in defaults:
            a.default = d
    return set(vars(given)) - set(parser._defaults)


def _fresh_train_parser() -> argparse.ArgumentParser:
    return add_parser(argparse.ArgumentParser().add_subparsers())


def resumed_config(args: argparse.Namespace, names):
    """--resume DIR: the saved run's config with the options given on this command line put over
    it (check_resume then refuses those that may not change). Returns (config, saved metadata)."""
    from .checkpoint import CheckpointError, load, saved_config

    with as_usage_error(CheckpointError, prefix="--resume: "):
        meta = load(args.resume, map_location="cpu")["meta"]
    given = given_options(args) & set(names)
    config = dataclasses.replace(saved_config(meta), **{k: getattr(args, k) for k in given})
    return config, meta


def check_output_options(args: argparse.Namespace) -> None:
    """What parsing could not check of --metrics-out and --plot (their folders it did)."""
    if args.metrics_out and args.plot and os.path.abspath(args.metrics_out) == os.path.abspath(args.plot):
        raise UsageError(f"--metrics-out and --plot name the same file {args.plot}")
    if args.plot:
        from .metrics import plot_format

        with as_usage_error(prefix="--plot: "):
            plot_format(args.plot)


def write_outputs(args: argparse.Namespace, metrics) -> None:
    from .metrics import History, plot_history, write_metrics

    if args.metrics_out:
        write_metrics(args.metrics_out, metrics)
        print(f"metrics written to {args.metrics_out}")
    if args.plot:
        history = History.from_json(metrics["layers"])
        title = f"{metrics['method']} on {metrics['model']}, {metrics['dataset']}: test accuracy {100 * metrics['test_accuracy']:.2f}%"
        plot_history(args.plot, history, title)
        print(f"plot written to {args.plot}")
