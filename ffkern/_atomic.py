"""Atomic file writes: a reader (or a later run) sees the old file or the whole new one, never a
half-written one, even if the writer is interrupted (Ctrl-C) or crashes in the middle."""
from __future__ import annotations

import os
import tempfile
from typing import IO, Callable

_umask = None


def _new_file_mode() -> int:
    """The mode open() would give a new file. mkstemp makes its file 0600 (private), which would
    otherwise stay on the renamed result; the umask can only be read by setting it, so once."""
    global _umask
    if _umask is None:
        _umask = os.umask(0o022)
        os.umask(_umask)
    return 0o666 & ~_umask


def atomic_write(path: str, write: Callable[[IO], None], *, binary: bool = False) -> None:
    """Calls ``write(f)`` on a temporary file in ``path``'s folder (created if missing), then
    renames it onto ``path`` (os.replace: atomic within one file system, which the same folder
    guarantees). On any exception, KeyboardInterrupt included, the temporary file is removed and
    ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else _new_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
