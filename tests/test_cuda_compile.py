"""Compile check of the CUDA kernels (csrc/cuda/*.cu) with plain nvcc for sm_80, sm_90 and sm_90a.

The kernel files include no torch headers, so this needs only nvcc, not a CUDA build of torch or a
GPU: it catches compile errors (and warnings, which fail the test too) where the kernels cannot
run, and register spills for sm_90/sm_90a (ptxas -v: a kernel that spills to local memory fails;
sm_80's ptxas keeps a few loop counters of the FF kernels' per-sample code in local memory, which
is not checked). The torch-side
binding (cuda_binding.cpp) is compiled when the extension is built with CUDA. Skipped, with the
reason shown, where nvcc is not found.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
KERNEL_FILES = sorted(CUDA_DIR.glob("*.cu"))


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    candidate = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


NVCC = find_nvcc()
# The macros torch's extension builds pass to nvcc: the kernels must not rely on implicit
# half/bfloat16 conversions or operators.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def test_kernel_files_exist():
    assert [p.name for p in KERNEL_FILES] == ["ff_kernels.cu", "per_class_kernels.cu", "supcon_kernels.cu"]
    for path in KERNEL_FILES:
        assert "torch" not in "".join(line for line in path.read_text().splitlines() if line.startswith("#include"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(path, arch, tmp_path):
    command = [NVCC, "-c", "-std=c++17", "-O3", f"-arch={arch}", *TORCH_NVCC_DEFINES, "-Xcompiler", "-Wall",
               "-Xptxas", "-v", str(path), "-o", str(tmp_path / "kernel.o")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(command)}\n{log}"
    assert "warning" not in log.lower(), f"{' '.join(command)}\n{log}"
    assert (tmp_path / "kernel.o").stat().st_size > 0
    if arch.startswith("sm_90"):  # the GPU machines' architecture: no kernel may spill there
        spills = spilling_kernels(log)
        assert not spills, f"{arch}: kernels spill registers to local memory: {spills}"


def spilling_kernels(ptxas_log: str) -> dict:
    """{kernel: (spill store bytes, spill load bytes)} of every kernel ptxas -v reports a spill for."""
    found, current = {}, None
    for line in ptxas_log.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            current = entry.group(1)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill and current and (int(spill.group(1)) or int(spill.group(2))):
            found[current] = (int(spill.group(1)), int(spill.group(2)))
    return found


def test_spill_parser_sees_a_spill():
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
           "    16 bytes stack frame, 36 bytes spill stores, 24 bytes spill loads\n"
           "ptxas info    : Compiling entry function '_Z1jv' for 'sm_90a'\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    assert spilling_kernels(log) == {"_Z1kv": (36, 24)}
