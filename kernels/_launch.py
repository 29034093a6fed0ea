"""Launch settings shared by the Triton kernels, and the one place kernels are launched.

Every launcher calls ``launch(kernel, grid, *args, **meta)``. Inside ``record_launches()`` a launch
is recorded instead of run: the ahead-of-time compile check and benchmarks/sass_report.py drive
the real launchers on CPU tensors and compile exactly what a GPU run would (same argument types,
same constexprs, same warps), with Triton's own specialization of the recorded arguments.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

_recording: list | None = None


def is_interpreter() -> bool:
    """TRITON_INTERPRET=1 runs kernels on the CPU with numpy (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp32_matmul_precision() -> str:
    """The user's fp32 matmul setting, "highest" (IEEE fp32) or "high"/"medium" (TF32 allowed).

    torch.get_float32_matmul_precision() raises once the newer per-backend API
    (torch.backends.cuda.matmul.fp32_precision = "tf32" / "ieee") has been used, so that one is read
    first; "none" there means the user did not set it and the legacy setting holds."""
    try:
        new = torch.backends.cuda.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        new = "none"
    if new == "tf32":
        return "high"
    if new == "ieee":
        return "highest"
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # mixed use of both APIs: follow the generic setting
        return "high" if torch.backends.fp32_precision == "tf32" else "highest"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow the user's fp32 matmul precision: "high"/"medium" allow TF32 tensor
    cores; "highest" runs 3xTF32 on the tensor cores (a split of each operand into a TF32 high part
    and a TF32 remainder: errors of fp32's order, where an IEEE product on the FMA units spills
    kilobytes of registers per thread). The interpreter computes in IEEE fp32 either way. Other
    dtypes ignore the setting."""
    if dtype != torch.float32:
        return "ieee"
    if fp32_matmul_precision() != "highest":
        return "tf32"
    return "ieee" if is_interpreter() else "tf32x3"


@dataclass
class Launch:
    """One kernel launch as the launcher made it (args in the kernel's parameter order)."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict  # constexprs and launch options (num_warps, ...)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__


@contextlib.contextmanager
def record_launches():
    """Records launches instead of running them; yields the list they are appended to."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta) on the device of the tensor arguments (Triton launches on the
    *current* CUDA device, which need not be theirs)."""
    if _recording is not None:
        _recording.append(Launch(kernel, tuple(grid), args, meta))
        return
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def unavailable_reason(device: torch.device):
    if device.type == "cuda":
        return None
    if device.type == "cpu" and is_interpreter():
        return None
    if device.type == "cpu":
        return ("Triton kernels need CUDA tensors; to run them on the CPU (slowly) set TRITON_INTERPRET=1 "
                "before triton is imported")
    return f"Triton kernels do not run on {device.type} tensors"
