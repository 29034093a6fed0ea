"""How one call is timed and how its peak memory is measured.

GPU: ``triton.testing.do_bench`` with CUDA events. It runs the call once plus warm-up calls that
are not timed, clears the L2 cache before every timed call, and returns every sample; we report
the median. Peak memory: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
minus what was allocated before the call (the inputs and all their rotated copies).
CPU: ``time.perf_counter`` around each call, median of the repeats after warm-up calls. Peak
memory: the process's peak resident set (VmHWM) after resetting it through /proc/self/clear_refs,
minus the resident set before the call. That is only honest in a process that returns freed
memory to the OS, so it runs in a fresh worker process (ffkern.bench.worker) and, for the memory
call only, glibc's mmap threshold is lowered to 64 KiB (every tensor of 64 KiB or more is its
own mapping, counted when touched and unmapped when freed) after trimming the heap. For the
timed calls the allocator is fixed at glibc's own steady state after large frees (mmap
threshold 32 MiB, trim threshold 64 MiB): the same for every provider and every measurement,
and without the page faults a 64 KiB threshold would add to every temporary.

Inputs rotate across several pre-allocated copies (``Rotation``) so that consecutive calls do not
find their inputs in a cache left warm by the previous call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch


@dataclass
class Timing:
    median_s: float
    samples_s: List[float] = field(default_factory=list)
    method: str = ""


class Rotation:
    """Cycles through pre-allocated input copies: each call of ``next()`` returns the next one."""

    def __init__(self, copies: Sequence):
        if not copies:
            raise ValueError("Rotation needs at least one input copy")
        self.copies, self.i = list(copies), 0

    def next(self):
        item = self.copies[self.i % len(self.copies)]
        self.i += 1
        return item


def cache_bytes(device: torch.device) -> int:
    """Last-level cache of the device (GPU L2; CPU L3 as sysfs reports it, capped: a host's
    shared L3 can be hundreds of MB, more than this process will see)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError, KeyError):
        value = 32 << 20
    return min(value, 64 << 20)


def copies_for(bytes_per_copy: int, cache: int, budget_bytes: float) -> int:
    """Copies so that all of them together are at least 4x the cache (2 to 8 of them); a single
    copy when one is already that large; fewer when they would take over a quarter of the budget."""
    if bytes_per_copy >= 4 * cache:
        return 1
    n = min(8, max(2, math.ceil(4 * cache / max(bytes_per_copy, 1))))
    while n > 1 and n * bytes_per_copy > budget_bytes / 4:
        n -= 1
    return n


def time_gpu(fn: Callable, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Timing:
    import triton.testing

    try:
        samples_ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    except (AssertionError, TypeError, ValueError):  # a triton without return_mode="all": the median only
        samples_ms = [triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")]
    samples = [t / 1e3 for t in samples_ms]
    return Timing(statistics.median(samples), samples,
                  f"triton.testing.do_bench (CUDA events, L2 cleared per call), median of {len(samples)}")


def time_cpu(fn: Callable, warmup: int = 1, repeats: int = 5, max_total_s: Optional[float] = None) -> Timing:
    """Median wall time of ``repeats`` calls after ``warmup`` calls (at least one). When
    ``max_total_s`` is given, the repeats stop early once they have used it (at least one)."""
    for _ in range(max(1, warmup)):
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if max_total_s is not None and time.perf_counter() - start > max_total_s:
            break
    return Timing(statistics.median(samples), samples,
                  f"time.perf_counter, median of {len(samples)} after {max(1, warmup)} warm-up")


def peak_gpu(fn: Callable) -> Tuple[int, str]:
    """Peak bytes allocated by one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    gc.collect()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak), "torch.cuda.max_memory_allocated beyond the allocation before the call"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
TIMING_MALLOC = (32 << 20, 64 << 20)  # mmap threshold, trim threshold: glibc's dynamic maximum
MEMORY_MALLOC = (64 << 10, 128 << 10)


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def set_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """Fixes glibc's mmap and trim thresholds; False where the C library is not glibc."""
    if _LIBC is None:
        return False
    ok = _LIBC.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
    ok &= _LIBC.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold))
    return bool(ok)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"{key} not in /proc/self/status")


def peak_cpu(fn: Callable) -> Tuple[Optional[int], str]:
    """Peak RSS of one call beyond the RSS before it, or (None, why) where the peak cannot be reset."""
    if not set_malloc(*MEMORY_MALLOC):
        return None, "peak RSS not measurable here (the C library is not glibc: no mallopt)"
    try:
        gc.collect()
        _LIBC.malloc_trim(ctypes.c_size_t(0))  # hand the heap's free pages back first
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0)
            before = _status_bytes("VmRSS:")
        except OSError as exc:
            return None, f"peak RSS not measurable here ({exc})"
        out = fn()
        peak = _status_bytes("VmHWM:") - before
        del out
    finally:
        set_malloc(*TIMING_MALLOC)
    return int(max(peak, 0)), "peak RSS (VmHWM after clear_refs, 64 KiB mmap threshold) of the worker beyond the RSS before the call"
