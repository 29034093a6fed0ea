"""Python registrations of the ffkern_per_class::* operators (csrc/cpu/per_class_cpu.cpp, and
csrc/cuda/per_class_binding.cpp where built with CUDA): fake implementations, so that the ops trace
under torch.compile(fullgraph=True), and autograd (ffkern.per_class.PerClassAutograd: first-order
reverse mode; double backward, forward mode and torch.func.grad raise naming ffkern and "cpp").

The C++ schemas name this module (m.set_python_module). Importing it loads the compiled library
first (building it if needed; see ffkern.cpp.build).
"""
from __future__ import annotations

import torch

from ..per_class import PerClassAutograd, grad_like
from . import build

build.load_library()

NAMESPACE = "ffkern_per_class"
OPS = torch.ops.ffkern_per_class


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(f"{NAMESPACE}::class_goodness")
def _class_goodness_fake(h, weight, bias):
    return h.new_empty((h.shape[0], weight.shape[0]), dtype=_stat(h.dtype))


@torch.library.register_fake(f"{NAMESPACE}::per_class_loss")
def _per_class_loss_fake(h, weight, labels, bias, scale, reduction):
    st = _stat(h.dtype)
    loss = h.new_empty((h.shape[0],) if reduction == "none" else (), dtype=st)
    return loss, h.new_empty((h.shape[0], weight.shape[0]), dtype=st)


@torch.library.register_fake(f"{NAMESPACE}::per_class_backward")
def _per_class_backward_fake(h, weight, bias, coef):
    st = _stat(h.dtype)
    return grad_like(h), h.new_empty((weight.shape[0], weight.shape[1]), dtype=st), h.new_empty((weight.shape[0],), dtype=st)


_autograd = PerClassAutograd("cpp", NAMESPACE, OPS)  # kept: it owns the autograd kernels
_autograd.register_all()
