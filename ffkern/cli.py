"""The ``ffkern`` command line: ``ffkern train ...`` and ``ffkern bench ...``.

Each subcommand lives in its own module with ``add_parser(subparsers)``, which registers the
subcommand and sets ``func`` (called with the parsed arguments, returns an exit code). Modules
are imported only to build the parser; heavy imports happen inside ``func``.

Errors in what the user gave: values are checked while parsing (argparse ``type=``; argparse
prints usage and the error, exit status 2); what only the command can check (a file's contents,
the device) it raises as ``UsageError``, which ``main`` alone turns into the same
``ffkern COMMAND: error: ...`` line and exit status 2. Every other exception is a bug and keeps
its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ._cliargs import UsageError

SUBCOMMANDS = ("ffkern.train.cli", "ffkern.bench.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffkern", description="Fused Forward-Forward loss kernels: training and benchmarks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):  # subcommand not part of this install
                continue
            raise
        mod.add_parser(sub)
    parser.subcommands = sub.choices  # name -> parser
    return parser


def _expand_recipes(parser: argparse.ArgumentParser, argv):
    """``train --recipe NAME``: the recipe's options go in its place (ffkern.train.recipes), and a
    recipe that needs what this ffkern lacks is refused naming what it needs."""
    if not argv or argv[0] != "train" or "train" not in getattr(parser, "subcommands", {}):
        return argv
    from .train import recipes

    train = parser.subcommands["train"]
    for i, arg in enumerate(argv):
        name = argv[i + 1] if arg == "--recipe" and i + 1 < len(argv) else (arg.split("=", 1)[1] if arg.startswith("--recipe=") else None)
        if name in recipes.RECIPES:
            recipe = recipes.RECIPES[name]
            missing = recipes.missing_options(recipe, train)
            if missing:
                raise UsageError(f"--recipe {name} needs {recipe.needs or 'options this ffkern lacks'}, which this"
                                 f" ffkern does not have yet (missing: {', '.join(missing)})")
    return [argv[0], *recipes.expand(argv[1:])]


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _expand_recipes(parser, argv)
    except UsageError as exc:
        print(f"{parser.prog} train: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # the subcommand's own arguments (ffkern train --resume: which options were given)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        # One line, as argparse writes its own errors ("ffkern train: error: ..."); the usage
        # text is left out: the options parsed, it is their values or the files that are wrong.
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
