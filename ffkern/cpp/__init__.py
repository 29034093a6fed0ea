"""Backend "cpp": the compiled C++/CUDA extension (csrc/), operators torch.ops.ffkern.*.

CPU kernels are multithreaded (at::parallel_for) with BLAS tiles and O(N*D) memory; CUDA kernels
(when built with CUDA) are tiled like FlashAttention. Importing this module compiles nothing: the
extension is built or loaded on the backend's first use (ffkern.cpp.build).
"""
from __future__ import annotations

import torch

from ..per_class import kernel_scale
from ..reference import normalize_rows
from . import build


def _ops():
    build.load_library()
    return torch.ops.ffkern


class CppBackend:
    name = "cpp"

    def unavailable_reason(self, device: torch.device):
        if device.type not in ("cpu", "cuda"):
            return f"the C++ extension has kernels for CPU and CUDA tensors only, not {device.type}"
        if not build.STATE.loaded:  # first use: build or load (the result is remembered)
            why = build.load_error()
            if why is not None:
                # first line: a one-line summary (what "auto" warns with); then the compiler's log
                return f"the C++ extension could not be built or loaded: {build.summary(why)}\n{why}"
        if device.type == "cuda" and not build.STATE.has_cuda:
            return ("the C++ extension was built without CUDA kernels (they are compiled when torch has "
                    "CUDA and nvcc is found, and for the just-in-time build a GPU is visible)")
        return None

    def supcon_rows(self, x, labels, temperature, margin, normalize):
        # normalized in PyTorch (fp32); the kernels' products read it rounded to x's dtype
        z = normalize_rows(x, normalize)
        loss, _lse, num_pos, num_clipped = _ops().supcon_rows(z, labels, float(temperature), float(margin), x.dtype)
        return loss, num_pos, num_clipped

    def supcon_forward(self, zr, yr, zc, yc, row_offset, temperature, margin):
        return _ops().supcon_forward(zr, yr, zc, yc, int(row_offset), float(temperature), float(margin))

    def supcon_backward(self, zr, yr, zc, yc, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c, temperature, margin):
        return _ops().supcon_backward(zr, yr, zc, yc, int(row_offset), lse_r, a_r, b_r, lse_c, a_c, b_c,
                                      float(temperature), float(margin))

    def goodness(self, h, kind, skip_tokens):
        return _ops().goodness(h, kind, int(skip_tokens))

    def pair_loss(self, loss, h_pos, h_neg, param, kind, skip_tokens, activity_term=False):
        param = 0.0 if param is None else float(param)  # sffa has no parameter
        # SFFA's activity factor is fused into the kernels (sums in the forward's pass, its constant in
        # the pass that writes dh)
        return _ops().pair_loss(h_pos, h_neg, loss, param, kind, int(skip_tokens), bool(activity_term))

    def class_goodness(self, h, weight, bias):
        from . import per_class_ops  # the per-class operators' registrations (loads the library)

        return per_class_ops.OPS.class_goodness(h, weight.reshape(weight.shape[0], -1), bias)

    def per_class_loss(self, h, weight, labels, bias, scale, reduction):
        from . import per_class_ops

        return per_class_ops.OPS.per_class_loss(h, weight.reshape(weight.shape[0], -1), labels, bias,
                                                kernel_scale(scale, h), reduction)[0]


__all__ = ["CppBackend"]
