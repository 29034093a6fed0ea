"""Backend "cpp": a just-in-time build that was interrupted must not block or break later uses.

torch serializes builds of a folder with ``<folder>/lock``, which a killed build leaves behind (and
every later torch build of that folder then waits forever); a killed link can leave a library that
does not load. ffkern.cpp.build guards builds with an flock of its own (see its docstring).

These tests do not compile from scratch: they copy the folder of the build this session loaded into
a temporary TORCH_EXTENSIONS_DIR (same sources, so the same folder name) and damage the copy; the
object files are kept, so a rebuild there is a link of a few seconds. Each check runs in a fresh
process, with a timeout, since a hang is the failure being tested.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ffkern.cpp import build

REPO = Path(__file__).resolve().parent.parent
HAVE_TOOLS = shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None
pytestmark = [
    pytest.mark.skipif(not HAVE_TOOLS, reason="no C++ compiler or no ninja here: the extension cannot be built"),
    pytest.mark.skipif(build.fcntl is None, reason="no fcntl (flock) on this platform"),
]
TIMEOUT_S = 240  # a relink takes seconds; a hang shows as this timeout

# Loads the extension with backend="cpp" and prints where it came from.
USE_CPP = """
    import torch, ffkern
    from ffkern.cpp import build
    loss = ffkern.marginal_supcon_loss(torch.randn(8, 2, 5), torch.arange(8) % 3, backend="cpp")
    assert torch.isfinite(loss)
    print("ORIGIN", build.STATE.origin)
"""


@pytest.fixture(scope="module")
def built_folder():
    """The JIT build folder of this session's extension (built here if needed)."""
    why = build.load_error()
    assert why is None, f"the C++ extension did not build:\n{why}"
    library = Path(build.STATE.origin)
    if library.parent.name != library.stem:
        pytest.skip(f"the extension was loaded from an ahead-of-time build ({library}), not a JIT build folder")
    return library.parent


def copy_build(src: Path, tmp_path: Path):
    """(TORCH_EXTENSIONS_DIR, folder, library) of a copy of the build folder, without its locks."""
    root = tmp_path / "ext"
    folder = root / src.name
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("lock", build.OWNER_FILE))  # keeps mtimes
    return root, folder, folder / f"{src.name}.so"


def env_for(root: Path):
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(root), "FFKERN_BACKEND": ""}


def run_python(code: str, root: Path):
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              cwd=REPO, env=env_for(root), timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung: no result after {TIMEOUT_S} s\nstderr:\n{exc.stderr}")


def assert_loaded(out, library: Path):
    assert out.returncode == 0, out.stderr
    assert f"ORIGIN {library}" in out.stdout, out.stdout + out.stderr


def test_stale_torch_lock_is_removed(built_folder, tmp_path):
    """torch's lock without a live owner (as SIGKILL/SIGTERM leaves it): removed, said so, rebuilt."""
    root, folder, library = copy_build(built_folder, tmp_path)
    library.unlink()  # so that a build is needed: only then does torch look at its lock
    (folder / "lock").touch()
    out = run_python(USE_CPP, root)
    assert_loaded(out, library)
    assert f"removing the stale lock {folder / 'lock'}" in out.stderr, out.stderr
    assert not (folder / "lock").exists()


def test_killed_build_does_not_block_the_next(built_folder, tmp_path):
    """A real build killed (SIGKILL, with ninja and the linker) while torch holds its lock."""
    root, folder, library = copy_build(built_folder, tmp_path)
    library.unlink()
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(USE_CPP)], cwd=REPO, env=env_for(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not (folder / "lock").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        if proc.poll() is not None:
            pytest.skip("the build finished before it could be killed (machine too fast or too slow)")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: python, ninja, the linker
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    left = (folder / "lock").exists()
    out = run_python(USE_CPP, root)
    assert_loaded(out, library)
    if left:  # the usual case: torch's lock outlived its owner
        assert "removing the stale lock" in out.stderr, out.stderr
    out = run_python(USE_CPP, root)  # and the repaired folder loads directly
    assert_loaded(out, library)
    assert "compiling" not in out.stderr, out.stderr


@pytest.mark.parametrize("damage", ["truncated", "bad-header"])
def test_corrupt_library_is_rebuilt(built_folder, tmp_path, damage):
    """A cached library that is damaged is linked again, once: the next process loads it directly.
    truncated (as an interrupted link leaves it): no longer matches the record of the finished build;
    loading it could crash the process (SIGBUS), so it must not be tried. bad-header: same size and
    mtime as recorded, yet it does not load (OSError)."""
    root, folder, library = copy_build(built_folder, tmp_path)
    stat = library.stat()
    with open(library, "r+b") as f:
        if damage == "truncated":
            f.truncate(4096)  # keeps the ELF header
        else:
            f.write(bytes(64))
    if damage == "bad-header":
        os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    out = run_python(USE_CPP, root)
    assert_loaded(out, library)
    said = "is not from a finished build" if damage == "truncated" else "does not load"
    assert f"the cached library {library} {said}" in out.stderr, out.stderr
    out = run_python(USE_CPP, root)
    assert_loaded(out, library)
    assert "compiling" not in out.stderr and "cached library" not in out.stderr, out.stderr


def hold_flock(folder: Path):
    """Takes ffkern's lock of ``folder`` as a live builder would; returns the descriptor."""
    import fcntl

    fd = os.open(folder / build.OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"pid {os.getpid()} (the test)\n".encode(), 0)
    return fd


def test_waits_for_a_live_builder_and_says_where(built_folder, tmp_path):
    """While another live process holds the lock, a second one waits and says whom it waits for and
    the lock's path; it goes on as soon as the lock is released."""
    root, folder, library = copy_build(built_folder, tmp_path)
    library.unlink()
    fd = hold_flock(folder)
    log = tmp_path / "stderr.txt"
    try:
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(USE_CPP)], cwd=REPO, env=env_for(root),
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.monotonic() + TIMEOUT_S
        while "waiting for" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        said = log.read_text()
        assert proc.poll() is None, f"did not wait for the lock:\n{said}"
        assert f"waiting for pid {os.getpid()} (the test)" in said and str(folder / build.OWNER_FILE) in said, said
    finally:
        os.close(fd)  # releases the flock
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still waiting after the lock was released:\n{log.read_text()}")
    assert proc.returncode == 0, log.read_text()
    assert f"ORIGIN {library}" in stdout


def test_wait_for_a_live_builder_is_bounded(tmp_path, monkeypatch):
    """A holder that never finishes (e.g. a hung compiler): the wait ends with an error naming the lock."""
    monkeypatch.setattr(build, "WAIT_LIMIT_S", 0.5)
    fd = hold_flock(tmp_path)
    try:
        lock = re.escape(str(tmp_path / build.OWNER_FILE))
        with pytest.raises(RuntimeError, match=f"gave up .* waiting for pid {os.getpid()} .*{lock}"):
            with build._folder_lock(tmp_path):
                pass
    finally:
        os.close(fd)
    with build._folder_lock(tmp_path) as held:  # free again: taken at once
        assert held


def test_without_flock_a_torch_lock_is_judged_by_age(tmp_path, capsys):
    """Where flock is unavailable: an old torch lock is removed; a young one is waited for, saying so."""
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - build.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    build._clear_stale_torch_lock(tmp_path, flock_held=False)
    assert not lock.exists() and f"removing the lock {lock}" in capsys.readouterr().err
    lock.touch()
    threading.Timer(1.0, lock.unlink).start()  # the live build finishing
    build._clear_stale_torch_lock(tmp_path, flock_held=False)
    assert f"waiting for the build that holds {lock}" in capsys.readouterr().err
