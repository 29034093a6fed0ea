"""Reuse of freed CPU memory: large activations without page faults (glibc only).

PyTorch's CPU allocator takes every tensor from malloc and gives it back on free. glibc serves an
allocation above its mmap threshold (at most 32 MiB on 64-bit Linux, whatever mallopt is told) by
a fresh mmap and unmaps it on free, so every large activation of every step is new memory: the
kernel faults it in 4 KiB at a time and zeroes each page. One ViT[128 4] block, forward and
backward on both CFF views concatenated (batch 1024, 64 tokens), measured 295 000 minor faults
per step that way (1.15 GB of fresh pages, about a third of the block's time on one core) and
16 000 with the heap kept (benchmarks/NOTES.md, "End to end").

``reuse_freed_cpu_memory()`` tells glibc to serve every allocation from its heap (M_MMAP_MAX = 0)
and to keep freed memory for reuse instead of returning it (M_TRIM_THRESHOLD = 1 GiB). The cost:
the process keeps its peak CPU memory until it exits (RSS does not shrink after a large step).
It is process-wide and cannot be undone in the process; GPU memory is not affected. `ffkern
train` applies it on the CPU unless told not to; other programs call it once at start.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Optional

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30

_applied = False


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def unavailable_reason() -> Optional[str]:
    """Why reuse_freed_cpu_memory() cannot work here (None: it can)."""
    if not sys.platform.startswith("linux"):
        return f"it needs glibc's malloc (Linux); this is {sys.platform}"
    if _glibc() is None:
        return "this Linux C library is not glibc (mallopt's parameters are glibc's)"
    return None


def reuse_freed_cpu_memory() -> bool:
    """Serve CPU allocations from the heap and keep freed memory (see the module's docstring).
    Returns True when applied (now or before in this process), False where it cannot be (not
    glibc: unavailable_reason() says why); never raises."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    _applied = bool(ok)
    return _applied


def applied() -> bool:
    """Whether reuse_freed_cpu_memory() took effect in this process."""
    return _applied
