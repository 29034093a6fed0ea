"""Backend registry and the "auto" choice.

A backend is an object with:
  name
  unavailable_reason(device) -> None, or a sentence saying why it cannot run on that device
  supcon_rows(x, labels, temperature, margin, normalize) -> (L [N], |P(i)| [N], clipped [N]),
      differentiable in the features x [N, D] (their own dtype; normalize: SPEC 1.2 step 1, which
      a backend may fuse into its kernels, as "triton" does)
  supcon_forward(zr, yr, zc, yc, row_offset, temperature, margin) -> (L [n], lse [n], |P| [n], clipped [n])
      anchors zr (global rows row_offset .. row_offset+n-1) against all rows zc; no autograd
  supcon_backward(zr, yr, zc, yc, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c, temperature, margin)
      -> dL/dzr [n, D] float32/64 by the symmetric pair term of SPEC 1.3 (reference.supcon_backward)
  The two primitives take normalized rows; the distributed loss is built on them.
  goodness(h, kind, skip_tokens) -> [B]
  pair_loss(loss, h_pos, h_neg, param, kind, skip_tokens, activity_term) -> scalar, loss in ("ff", "symba", "sffa");
    activity_term (sffa only): times SFFA's activity factor A (SPEC 2)
Backends are imported lazily: importing ffkern imports neither triton nor a compiled extension.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("reference", "triton", "cpp")
_MODULES = {
    "reference": ("ffkern.reference", "ReferenceBackend"),
    "triton": ("ffkern.kernels", "TritonBackend"),
    "cpp": ("ffkern.cpp", "CppBackend"),
}
_instances: dict = {}
_warned: set = set()


class BackendUnavailable(RuntimeError):
    """A named backend cannot run for these tensors (the message says why)."""


def _instance(name: str):
    if name not in _instances:
        module, cls = _MODULES[name]
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def auto_order(device: torch.device):
    """Backends "auto" tries, fastest first, for tensors on ``device``."""
    if device.type == "cuda":
        return ("triton", "cpp", "reference")
    return ("cpp", "reference")


def check_backend_name(backend) -> str:
    """The name's checks alone (what a module checks at construction; availability depends on the
    tensors' device and is checked at the call)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    return backend


def resolve(backend, device: torch.device):
    """Returns the backend object to use for tensors on ``device``.

    Safe to call inside torch.compile(fullgraph=True), also as the first use of a backend in the
    process: the choice (which imports the backend, may build the C++ extension, reads
    FFKERN_BACKEND) runs as ordinary Python at trace time, and the traced code only reads the
    registry that it filled."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return _instances[_choose(backend, device.type, device.index)]


@torch.compiler.assume_constant_result
def _choose(backend: str, device_type: str, device_index) -> str:
    """The name of the backend to use (its instance created in _instances), or an exception."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    source = "backend"
    if backend == "auto":
        env = os.environ.get("FFKERN_BACKEND", "").strip()
        if env and env != "auto":
            backend, source = env, "FFKERN_BACKEND"
    if backend == "auto":
        for name in auto_order(device):
            if name == "triton" and not triton_importable():
                continue
            impl = _instance(name)
            why = impl.unavailable_reason(device)
            if why is None:
                return name
            if name == "cpp" and name not in _warned:  # a failed build: say so once, in one line
                _warned.add(name)
                first = why.strip().splitlines()[0].rstrip(":") if why.strip() else why
                warnings.warn(f"ffkern: backend 'cpp' unavailable, 'auto' falls back ({first}); "
                              f"backend='cpp' raises with the full message",
                              RuntimeWarning, stacklevel=4)
        _instance("reference")
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    if backend == "triton" and not triton_importable():
        raise BackendUnavailable("backend 'triton' needs the triton package, which is not installed (pip install triton)")
    impl = _instance(backend)
    why = impl.unavailable_reason(device)
    if why is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot run here: {why}")
    return backend
