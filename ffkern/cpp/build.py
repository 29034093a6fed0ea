"""Finds, builds and loads the compiled extension of the "cpp" backend (the ffkern::* operators).

Order of attempts, on the first use of the backend (never on ``import ffkern``):
  1. an ahead-of-time build installed as ``ffkern/_C*.so``
     (``FFKERN_BUILD_EXT=1 pip install --no-build-isolation .``);
  2. a just-in-time build with ``torch.utils.cpp_extension.load`` and ninja, cached in torch's
     extension directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a
     name that hashes the sources, the flags and the torch and Python versions: an edit or an
     upgrade builds anew; an existing build is loaded directly (no ninja run, well under a second).
     One line on stderr announces a build. CUDA kernels are included when torch has CUDA, a GPU
     is visible and nvcc is found.
A failure (no compiler, no ninja, a compile error) is remembered with its message; the backend then
reports itself unavailable with that message (see ffkern.cpp.CppBackend and ffkern._backend).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import threading
from pathlib import Path
from typing import List, Optional

import torch

_lock = threading.RLock()


class _State:
    loaded = False  # the operators are registered in this process
    error: Optional[str] = None  # why they could not be (kept: a failed build is not retried)
    has_cuda = False  # CUDA kernels registered
    origin = ""  # what was loaded: path of the library


STATE = _State()


def source_dir() -> Path:
    """csrc/: shipped as package data ``ffkern/_csrc`` by ``pip install .``; in a source checkout
    (editable install) it is the repository's top-level csrc/."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "ffkern_ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"the C++ sources (csrc/) were not found next to {package}")


def sources(root: Path, with_cuda: bool) -> List[Path]:
    files = [root / "ffkern_ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cpp"))
    return files


def cxx_flags() -> List[str]:
    # -fopenmp: at::parallel_for is header code that is only parallel when compiled with OpenMP.
    # -fno-trapping-math: lets GCC vectorize the branch-free selects of the element loops (it does not
    # change IEEE results; it only drops the assumption that FP exceptions trap).
    flags = ["-O3", "-fno-trapping-math"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
    return flags


def ld_flags() -> List[str]:
    # Links libgomp by its soname, which resolves to the copy torch has already loaded.
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cuda_flags() -> List[str]:
    return ["-O3", "-lineinfo"]


def want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def _jit_name(files: List[Path], with_cuda: bool) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    root = source_dir()
    for f in sorted([*root.rglob("*.h"), *root.rglob("*.cuh")]):
        digest.update(f.read_bytes())  # headers are inputs too
    digest.update(repr((cxx_flags(), ld_flags(), cuda_flags(), torch.__version__, sys.version)).encode())
    return f"ffkern_{'cuda' if with_cuda else 'cpu'}_{digest.hexdigest()[:12]}"


def _load_aot() -> Optional[str]:
    """Loads ffkern/_C*.so if an ahead-of-time build is installed; returns its path or None."""
    spec = importlib.util.find_spec("ffkern._C")
    if spec is None or not spec.origin:
        return None
    try:
        torch.ops.load_library(spec.origin)
    except OSError as exc:  # e.g. built against another torch: fall back to the JIT build
        print(f"ffkern: ignoring the prebuilt extension {spec.origin} ({exc}); building it now", file=sys.stderr)
        return None
    return spec.origin


def _build_jit() -> str:
    from torch.utils import cpp_extension

    with_cuda = want_cuda()
    root = source_dir()
    files = sources(root, with_cuda)
    name = _jit_name(files, with_cuda)
    build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
    library = build_dir / f"{name}.so"
    if library.exists():  # built before from these very sources and flags (the name says so)
        try:
            torch.ops.load_library(str(library))
            return str(library)
        except OSError:
            pass  # e.g. left half-written by an interrupted build: build it again below
    print(f"ffkern: compiling the C++ extension of backend 'cpp' ({'CPU+CUDA' if with_cuda else 'CPU'}) "
          f"into {build_dir} (first use only, about a minute)...", file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(f) for f in files],
        extra_cflags=cxx_flags(),
        extra_ldflags=ld_flags(),
        extra_cuda_cflags=cuda_flags() if with_cuda else None,
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


def _short(message: str, lines: int = 40) -> str:
    """The first line and the tail of a compiler log: where the error is, without pages of
    command lines."""
    text = message.strip().splitlines()
    return "\n".join(text if len(text) <= lines + 1 else [text[0], "...", *text[-lines:]])


def summary(message: str, width: int = 200) -> str:
    """One line saying what went wrong: the first compiler/shell error line of a build log (the
    log's own first line is torch's "Error building extension" followed by a command line)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines[1:]:
        if re.search(r"error|not found|no such file|cannot", line, re.IGNORECASE) and not line.startswith("FAILED"):
            return line if len(line) <= width else line[: width - 3] + "..."
    first = lines[0] if lines else "unknown error"
    return first if len(first) <= width else first[: width - 3] + "..."


def load_library() -> None:
    """Registers the ffkern::* operators in this process (builds them if needed). Raises
    RuntimeError with the compiler's message if they cannot be; later calls re-raise it."""
    if STATE.loaded:
        return
    with _lock:
        if STATE.loaded:
            return
        if STATE.error is not None:
            raise RuntimeError(STATE.error)
        try:
            if not STATE.origin:  # a library can be loaded only once per process
                STATE.origin = str(_load_aot() or _build_jit())
                STATE.has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("ffkern::supcon_forward", "CUDA")
            importlib.import_module("ffkern.cpp.ops")  # fake and autograd registrations
        except Exception as exc:  # noqa: BLE001 - any failure (compiler, ninja, loader) is reported
            STATE.error = _short(f"{type(exc).__name__}: {exc}")
            raise RuntimeError(STATE.error) from exc
        STATE.loaded = True


def load_error() -> Optional[str]:
    """None once the operators are registered, else the reason (building on first call)."""
    if STATE.loaded:
        return None
    try:
        load_library()
    except RuntimeError as exc:
        return str(exc)
    return None
