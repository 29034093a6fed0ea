"""ffkern.cpu_heap: with it, a freed large tensor's memory is reused without page faults; the
setting is process-wide, so each case runs in a fresh interpreter."""
import subprocess
import sys
import textwrap

import pytest

from ffkern import cpu_heap

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from ffkern import cpu_heap
    applied = cpu_heap.reuse_freed_cpu_memory() if sys.argv[1] == "on" else False
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # 64 MiB: above glibc's largest mmap threshold. Warm-up: the first few allocations can land
    # above small blocks that the first fill_ allocates (thread pool start-up), so the heap grows
    # a few times before it holds the pattern (seen: up to 5 times); the claim is the steady state.
    for _ in range(8):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    before = faults()
    for _ in range(4):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # allocated, touched and freed again
    print(applied, cpu_heap.applied(), faults() - before)
""")


def run(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, reported, faults = out.split()
    return applied == "True", reported == "True", int(faults)


@pytest.mark.skipif(cpu_heap.unavailable_reason() is not None, reason=f"ffkern.cpu_heap: {cpu_heap.unavailable_reason()}")
def test_freed_memory_is_reused_without_page_faults():
    _, _, faults_default = run("off")
    applied, reported, faults = run("on")
    assert applied and reported
    pages = 4 * (64 << 20) // 4096  # what four fresh 64 MiB mappings fault in at 4 KiB pages
    assert faults_default > pages // 2, f"glibc's default should map fresh memory: only {faults_default} faults"
    assert faults < pages // 20, f"{faults} page faults for reused memory (default: {faults_default})"


def test_unavailable_is_said_not_raised(monkeypatch):
    monkeypatch.setattr(cpu_heap, "_glibc", lambda: None)
    monkeypatch.setattr(cpu_heap, "_applied", False)
    assert cpu_heap.reuse_freed_cpu_memory() is False
    assert cpu_heap.unavailable_reason()
