"""What the ``ffkern`` subcommands share to refuse bad input: the user-error exception that
ffkern/cli.py turns into one ``ffkern COMMAND: error: ...`` line and exit status 2, and argparse
``type=`` functions that check a value while the command line is parsed.

Standard library only: the parser is built without importing torch (ffkern/cli.py's rule).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
from typing import Callable, Optional


class UsageError(ValueError):
    """Something the user gave (an option, a file) cannot work; the message names it.

    ffkern/cli.py prints it as one line and exits 2, as argparse does. It is raised, or converted
    to (``as_usage_error``), only where the cause is known to be the input, so that any other
    exception stays a traceback: a bug to report, not the user's mistake. A ValueError, so
    callers of the Python API catch it like the library's other argument errors.
    """


@contextlib.contextmanager
def as_usage_error(*kinds: type, prefix: str = ""):
    """Inside, the exceptions ``kinds`` (default ValueError) become UsageError. For checks whose
    documented contract is "bad input raises ValueError naming the argument", and nothing else:
    wrapping work here would turn its bugs into "user errors"."""
    kinds = kinds or (ValueError,)
    try:
        yield
    except UsageError:
        raise
    except kinds as exc:
        raise UsageError(f"{prefix}{exc}") from exc


# ---------------------------------------------------------------- numbers
def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"  # what argparse calls the type in its own messages
    return parse


def real(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in [low, high] (``low_open``: > low). float() alone takes
    'nan' and 'inf', which no option of ffkern means."""
    if low is None:
        wanted = "a finite number"
    else:
        wanted = f"a number {'>' if low_open else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


# ---------------------------------------------------------------- names and paths
def path_component(text: str) -> str:
    """argparse type: a name used as one folder under an output root (``ffkern bench --tag``).
    A separator or '..' would put the files somewhere else than under the root."""
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if not text or text in (".", "..") or ".." in text or any(s in text for s in seps) or "\0" in text:
        raise argparse.ArgumentTypeError(
            f"must be a plain folder name (no path separator, no '..', not empty), got {text!r}")
    return text


def _nearest_existing(path: str) -> str:
    """``path`` itself or the closest folder above it that exists."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _folder_problem(folder: str) -> Optional[str]:
    """Why files cannot be created in ``folder`` (which may not exist yet: it is made at write
    time, so its closest existing ancestor must let us make it), or None."""
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        return f"{existing} is not a folder"
    import tempfile

    # A real probe (a file made and removed at once) rather than os.access: root passes every
    # permission check, but still cannot write on a read-only mount or in /proc. Making a file
    # needs the same rights as making the missing subfolder.
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".ffkern-probe-")
    except OSError as exc:
        what = f"write in {folder}" if existing == folder else f"create the folder {folder} in {existing}"
        return f"cannot {what}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(probe)
    return None


def output_file_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be written as a file, checked before any work (so a long run is not
    lost at its end), or None."""
    if not path:
        return "the file name is empty"
    full = os.path.abspath(path)
    if os.path.isdir(full):
        return f"{path} is a folder; give a file name"
    return _folder_problem(os.path.dirname(full))


def output_file(text: str) -> str:
    """argparse type: a file we will be able to write (its folder is created if missing)."""
    problem = output_file_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_dir(text: str) -> str:
    """argparse type: a folder we will be able to write in (created if missing)."""
    if not text:
        raise argparse.ArgumentTypeError("the folder name is empty")
    full = os.path.abspath(text)
    problem = _folder_problem(full)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


# ---------------------------------------------------------------- layer slices
def layer_indices(spec: str, depth: int) -> list:
    """The layers (0 .. depth-1) that ``spec`` names: ``all``, ``last``, ``first``, an index
    (``-1``), a Python slice (``1:``, ``:-1``, ``::2``) or a comma list of indices (``0,2,-1``);
    negative indices count from the end. Sorted, without repeats; ValueError if none or out of range."""
    text = str(spec).strip().replace(" ", "")
    named = {"all": "0:", "last": "-1", "first": "0"}
    text = named.get(text.lower(), text)
    if ":" in text:
        parts = text.split(":")
        if len(parts) > 3:
            raise ValueError(f"{spec!r} is not a slice start:stop[:step]")
        try:
            bounds = [int(p) if p else None for p in parts]
        except ValueError:
            raise ValueError(f"{spec!r}: a slice's bounds must be integers, e.g. 1: or :-1 or ::2") from None
        if len(bounds) == 3 and bounds[2] is not None and bounds[2] == 0:
            raise ValueError(f"{spec!r}: a slice step must not be 0")
        chosen = list(range(depth))[slice(*bounds)]
    else:
        try:
            wanted = [int(p) for p in text.split(",")]
        except ValueError:
            raise ValueError(f"{spec!r} is not all, last, first, an index, a slice such as 1: or a list such as 0,2") from None
        bad = [i for i in wanted if not -depth <= i < depth]
        if bad:
            raise ValueError(f"{spec!r}: layer {bad[0]} is not among the {depth} layers (0 .. {depth - 1}, or -1 .. -{depth})")
        chosen = [i % depth for i in wanted]
    chosen = sorted(set(chosen))
    if not chosen:
        raise ValueError(f"{spec!r} selects none of the {depth} layers")
    return chosen


def layer_spec(text: str) -> str:
    """argparse type of a layer selection (``layer_indices``): its form is checked while parsing,
    its range once the number of layers is known."""
    try:
        layer_indices(text, 1_000_000)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


layer_spec.__name__ = "layers"
