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

Interrupted builds. torch serializes builds of a folder with a file ``<build folder>/lock`` that it
creates and removes in a ``finally``: a build killed by SIGKILL or SIGTERM leaves it behind, and every
later torch build of that folder waits for it forever, silently. So ffkern builds (and repairs) a
folder only while holding its own lock, an flock on ``<build folder>/ffkern-build.lock``, which the
operating system releases however its holder dies; the file names the holder (pid, host, start).
Holding it, ffkern knows that a torch ``lock`` present was left by a dead build and removes it
(saying so on stderr). A process that finds the flock held says on stderr whom it waits for and
where, and gives up after WAIT_LIMIT_S (the backend is then unavailable with that message). Where
flock is unavailable, a torch ``lock`` older than STALE_LOCK_S counts as stale. A finished build
records its library's size and mtime in ``<library>.ok``; a cached library that does not match that
record (e.g. truncated by an interrupted link) or does not load is deleted and linked again.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; a stale torch lock is then recognized by its age only
    fcntl = None

_lock = threading.RLock()

OWNER_FILE = "ffkern-build.lock"  # ffkern's flock; torch's own lock file is "lock"
WAIT_LIMIT_S = 1800.0  # longest wait for another live process's build (a CUDA build on 2 cores is ~10 min)
STALE_LOCK_S = 600.0  # without flock: age after which a torch lock is taken as left by a dead build
# Part of the build folder's name, so that a folder is shared only by ffkern versions that all take
# the flock above: one holding it may then remove torch's lock (an older ffkern, which does not take
# the flock, could be building with the very same sources and flags otherwise).
_FOLDER_PROTOCOL = "flock-1"


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
    files = [root / "ffkern_ops.cpp", root / "ff_autograd.cpp", *sorted((root / "cpu").glob("*.cpp"))]
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
    inputs = (cxx_flags(), ld_flags(), cuda_flags(), torch.__version__, sys.version, _FOLDER_PROTOCOL)
    digest.update(repr(inputs).encode())
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


def _say(message: str) -> None:
    print(f"ffkern: {message}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _owner(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def _wait_for_flock(fd: int, path: Path) -> None:
    """Blocks until the flock on ``path`` (open as ``fd``) is ours, saying whom it waits for and
    where; raises after WAIT_LIMIT_S."""
    owner = _owner(path)
    _say(f"waiting for {owner} to finish building the C++ extension in {path.parent} (lock {path}); "
         f"if no such build is running, delete that folder")
    start = time.monotonic()
    note = start + 120.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - start
        if waited > WAIT_LIMIT_S:
            raise RuntimeError(
                f"ffkern: gave up after {waited / 60:.0f} minutes waiting for {owner} to finish building the C++ "
                f"extension in {path.parent} (lock {path}); end that process or delete the folder")
        if time.monotonic() >= note:
            _say(f"still waiting ({waited:.0f} s) for {owner} (lock {path})")
            note += 120.0
        time.sleep(0.2)


@contextlib.contextmanager
def _folder_lock(build_dir: Path):
    """Holds ffkern's flock on ``build_dir`` (see the module docstring). Yields True when held, False
    where flock is unavailable (then only the age of a torch lock tells it is stale)."""
    if fcntl is None:
        yield False
        return
    path = build_dir / OWNER_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _wait_for_flock(fd, path)
        except OSError as exc:  # e.g. a network file system without locks
            _say(f"cannot lock {path} ({exc}); building without ffkern's lock")
            yield False
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _clear_stale_torch_lock(build_dir: Path, flock_held: bool) -> None:
    """Removes torch's ``lock`` left by a dead build, which would make cpp_extension.load wait forever."""
    lock = build_dir / "lock"
    if flock_held:
        # Every build of this folder holds the flock (see _FOLDER_PROTOCOL): a torch lock seen while
        # holding it belongs to a build that died.
        if lock.exists():
            _say(f"removing the stale lock {lock} left by an interrupted build")
            lock.unlink(missing_ok=True)
        return
    announced = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_S:
            _say(f"removing the lock {lock}: older than {STALE_LOCK_S / 60:.0f} minutes, left by an interrupted build")
            lock.unlink(missing_ok=True)
            return
        if not announced:
            _say(f"waiting for the build that holds {lock} (started {age:.0f} s ago; the lock counts as stale "
                 f"after {STALE_LOCK_S / 60:.0f} minutes)")
            announced = True
        time.sleep(0.5)


def _stamp(library: Path) -> str:
    st = library.stat()
    return f"{st.st_size} {st.st_mtime_ns}\n"


def _is_complete(library: Path) -> bool:
    """Whether ``library`` is the one a finished build loaded (its size and mtime as recorded then).
    Checked before loading it: a truncated library can crash the process in dlopen (SIGBUS) rather
    than fail to load, so a library not known complete is never loaded, only linked again."""
    try:
        return library.with_name(library.name + ".ok").read_text() == _stamp(library)
    except OSError:
        return False


def _mark_complete(library: Path) -> None:
    marker = library.with_name(library.name + ".ok")
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}")
    tmp.write_text(_stamp(library))
    os.replace(tmp, marker)  # atomic: a reader sees the old record or the new one


def _build_jit() -> str:
    from torch.utils import cpp_extension

    with_cuda = want_cuda()
    root = source_dir()
    files = sources(root, with_cuda)
    name = _jit_name(files, with_cuda)
    build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
    library = build_dir / f"{name}.so"
    if _is_complete(library):  # built before from these very sources and flags (the name says so)
        try:
            torch.ops.load_library(str(library))
            return str(library)
        except OSError:
            pass  # complete, yet does not load: decided under the lock below
    build_dir.mkdir(parents=True, exist_ok=True)
    with _folder_lock(build_dir) as flock_held:
        if _is_complete(library):  # e.g. finished by the process we waited for
            try:
                torch.ops.load_library(str(library))
                return str(library)
            except OSError as exc:
                _say(f"the cached library {library} does not load ({_first_line(exc)}); building it again")
                library.unlink()
        elif library.exists():
            # left by an interrupted link, or damaged: ninja would take it as up to date, and loading
            # it would fail (or crash) in every process
            _say(f"the cached library {library} is not from a finished build (interrupted, or changed since); "
                 f"building it again")
            library.unlink()
        _clear_stale_torch_lock(build_dir, flock_held)
        _say(f"compiling the C++ extension of backend 'cpp' ({'CPU+CUDA' if with_cuda else 'CPU'}) "
             f"into {build_dir} (first use only, about a minute)...")
        try:
            path = cpp_extension.load(
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
        except OSError as exc:  # built, yet does not load: e.g. a damaged object file ninja took as current
            raise RuntimeError(f"ffkern: the library built in {build_dir} does not load ({exc}); delete that "
                               f"folder to build it from scratch") from exc
        _mark_complete(library)
        return path


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
