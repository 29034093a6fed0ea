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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
