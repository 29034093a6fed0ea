"""Python registrations of the ffkern_per_class::* operators (csrc/cpu/per_class_cpu.cpp, and
csrc/cuda/per_class_binding.cpp where built with CUDA): fake implementations, so that the ops trace
under torch.compile(fullgraph=True), and autograd (ffkern.per_class.PerClassAutograd: first-order
reverse mode; double backward, forward mode and torch.func.grad raise naming ffkern and "cpp").

The C++ schemas name this module (m.set_python_module). Importing it loads the compiled library
first (building it if needed; see ffkern.cpp.build).
"""
from __future__ import annotations

import torch

from ..per_class import PerClassAutograd, register_fakes
from . import build

build.load_library()

NAMESPACE = "ffkern_per_class"
OPS = torch.ops.ffkern_per_class


register_fakes(NAMESPACE)

_autograd = PerClassAutograd("cpp", NAMESPACE, OPS)  # kept: it owns the autograd kernels
_autograd.register_all()
