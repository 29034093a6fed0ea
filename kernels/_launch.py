"""Launch settings shared by the Triton kernels."""
from __future__ import annotations

import os

import torch


def is_interpreter() -> bool:
    """TRITON_INTERPRET=1 runs kernels on the CPU with numpy (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch.get_float32_matmul_precision(): "highest" is IEEE fp32, anything
    else allows TF32 tensor cores. Other dtypes ignore the setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def unavailable_reason(device: torch.device):
    if device.type == "cuda":
        return None
    if device.type == "cpu" and is_interpreter():
        return None
    if device.type == "cpu":
        return ("Triton kernels need CUDA tensors; to run them on the CPU (slowly) set TRITON_INTERPRET=1 "
                "before triton is imported")
    return f"Triton kernels do not run on {device.type} tensors"
