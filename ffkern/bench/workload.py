"""What a measurement counts as work, and how much memory a provider is predicted to need.

Work (the rate is work / median time, the fraction is rate / the device's measured ceiling):
  SupCon forward           2 N^2 D flops   (the similarity product s = z z^T)
  SupCon forward+backward  6 N^2 D flops   (forward product, recomputed product, gradient product)
  FF losses                bytes read plus written by a two-pass kernel: the forward reads h+ and
                           h- (2 S elements, S = B*D each); the backward reads them again and writes
                           dh+ and dh- (4 S): 6 S elements for forward+backward. Per-sample values
                           (B numbers) are counted too but are negligible.
Memory (bytes beyond the inputs, used to skip a size before it can exhaust the device):
  unfused providers keep about K N x N float32 matrices alive; K measured with the reference on
  the CPU (peak RSS of a fresh worker): 6.8 for forward+backward, 5.8 for forward; rounded up.
  fused providers keep O(N D): normalized rows, per-row statistics, the gradient.
Once a provider has been measured at a smaller size, the prediction scales that measurement
instead (N^2 or N), so the model only decides the first size of a series.
"""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("fwd", "fwdbwd")
QUADRATIC_K = {"fwd": 7.0, "fwdbwd": 8.0}
LINEAR_C = {"fwd": 4.0, "fwdbwd": 8.0}
FF_REFERENCE_C = {"fwd": 4.0, "fwdbwd": 8.0}  # float32 copies / squares of both inputs (per element, x4 bytes)
FF_FUSED_C = {"fwd": 0.0, "fwdbwd": 2.0}  # the two gradients (per element, x element size)
SLACK = 1 << 20  # allocator rounding, per-row vectors of small sizes


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def supcon_flops(n: int, d: int, mode: str) -> float:
    return (2.0 if mode == "fwd" else 6.0) * n * n * d


def supcon_exps(n: int, mode: str) -> float:
    """Exponentials: one per pair in the forward (logsumexp), two in the backward (p_kj, p_jk)."""
    return (1.0 if mode == "fwd" else 3.0) * n * n


def ff_bytes(size: int, dtype: str, mode: str) -> float:
    """Bytes read plus written for pairs h+, h- of ``size`` elements each (see the module doc)."""
    elements = (2 if mode == "fwd" else 6) * size
    return float(elements * element_size(dtype))


def supcon_input_bytes(n: int, d: int, dtype: str) -> int:
    return n * d * element_size(dtype) + n * 8  # rows + int64 labels


def ff_input_bytes(size: int, dtype: str) -> int:
    return 2 * size * element_size(dtype)


def gradient_bytes(kind: str, n_or_size: int, d: int, dtype: str, mode: str) -> int:
    """The gradient the measured call returns (an output, not workspace)."""
    if mode != "fwdbwd":
        return 0
    if kind == "supcon":
        return n_or_size * d * element_size(dtype)
    return 2 * n_or_size * element_size(dtype)


def predicted_extra_bytes(fused: bool, kind: str, mode: str, n_or_size: int, d: int, dtype: str) -> float:
    """Model of the peak bytes beyond the inputs of one call (``fused``: the provider's attribute)."""
    if kind == "supcon":
        n = n_or_size
        if not fused:
            return QUADRATIC_K[mode] * n * n * 4 + SLACK
        return LINEAR_C[mode] * n * d * 4 + SLACK
    size = n_or_size
    if not fused:  # unfused FF losses: float32 temporaries of both inputs
        return FF_REFERENCE_C[mode] * 2 * size * 4 + gradient_bytes("ff", size, d, dtype, mode) + SLACK
    return FF_FUSED_C[mode] * size * element_size(dtype) + SLACK


def scaled(prev_value: float, prev_n: int, n: int, power: float) -> float:
    return prev_value * (n / prev_n) ** power
