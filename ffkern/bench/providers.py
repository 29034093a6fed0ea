"""The implementations a benchmark compares, behind one small interface.

  reference  the reference backend's loss in eager PyTorch (builds the N x N matrices)
  compile    torch.compile of exactly that function (fullgraph, so a graph break is an error,
             never a silent fall-back to eager)
  triton     ffkern's public loss with backend="triton" (CUDA only: the Triton interpreter is a
             correctness tool, never benchmarked)
  cpp        ffkern's public loss with backend="cpp" (the compiled extension)

A provider answers ``unavailable_reason(device)`` (None or a sentence), ``supcon(x, labels)`` and
``pair_loss(loss, h_pos, h_neg)``; each returns a differentiable scalar.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .. import reference

PROVIDERS = ("reference", "compile", "triton", "cpp")
FUSED = ("triton", "cpp")  # O(N*D) memory; the others build N x N matrices
TRITON_NEEDS_CUDA = "needs CUDA (the Triton interpreter on the CPU is a correctness tool, not benchmarked)"
FF_LOSSES = ("ff", "symba", "sffa")
# Loss settings used by every measurement: CFF's temperature and its first-layer margin (the
# margin makes the clipped-positive branch part of the measured work).
TEMPERATURE = 0.15
MARGIN = 0.4
FF_PARAMS = {"ff": 2.0, "symba": 4.0, "sffa": None}  # threshold theta, alpha, (none)


def reference_supcon_loss(x: torch.Tensor, labels: torch.Tensor, temperature: float = TEMPERATURE,
                          margin: float = MARGIN) -> torch.Tensor:
    """Eager reference: normalize rows, per-anchor loss from the full N x N matrices, mean."""
    z = F.normalize(x.to(reference.compute_dtype(x.dtype)), dim=1, eps=1e-12)
    per_anchor, _, _ = reference.supcon_rows(z, labels, temperature, margin)
    return per_anchor.sum() / per_anchor.shape[0]


def reference_pair_loss(loss: str, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    if loss == "sffa":
        return reference.sffa_loss(h_pos, h_neg)
    return reference.PAIR_LOSSES[loss](h_pos, h_neg, FF_PARAMS[loss])


class ReferenceProvider:
    name = "reference"
    fused = False  # builds N x N matrices (SupCon) and float32 temporaries (FF)

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None

    def supcon(self, x, labels):
        return reference_supcon_loss(x, labels)

    def pair_loss(self, loss, h_pos, h_neg):
        return reference_pair_loss(loss, h_pos, h_neg)


class CompileProvider:
    """torch.compile of the reference functions above.

    dynamic=False (default) compiles one specialized graph per shape, the best case for the
    compiler; every new shape is a recompile, so the recompile limit is raised (otherwise dynamo
    would fall back to eager after 8 shapes without an error). Compilation happens in the
    warm-up calls, never in a timed one."""

    name = "compile"
    fused = False

    def __init__(self, backend: str = "inductor", dynamic: Optional[bool] = False):
        self.backend, self.dynamic = backend, dynamic
        self._fns: Dict[str, object] = {}

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        return None

    def _compiled(self, key, fn):
        if key not in self._fns:
            import torch._dynamo.config as dynamo_config

            for limit in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, limit):
                    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 1024))
            if hasattr(dynamo_config, "accumulated_recompile_limit"):
                dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
            self._fns[key] = torch.compile(fn, fullgraph=True, dynamic=self.dynamic, backend=self.backend)
        return self._fns[key]

    def supcon(self, x, labels):
        return self._compiled("supcon", reference_supcon_loss)(x, labels)

    def pair_loss(self, loss, h_pos, h_neg):
        return self._compiled("pair", reference_pair_loss)(loss, h_pos, h_neg)


class BackendProvider:
    """ffkern's public functions with an explicit backend (what a user calls)."""

    fused = True  # O(N*D) memory: no N x N buffer

    def __init__(self, name: str):
        self.name = name

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        from .._backend import BackendUnavailable, resolve

        if self.name == "triton" and device.type != "cuda":
            return TRITON_NEEDS_CUDA
        try:
            resolve(self.name, device)
        except BackendUnavailable as exc:
            return str(exc).strip().splitlines()[0]
        return None

    def supcon(self, x, labels):
        from ..marginal_supcon import marginal_supcon_loss

        return marginal_supcon_loss(x, labels, temperature=TEMPERATURE, margin=MARGIN, backend=self.name)

    def pair_loss(self, loss, h_pos, h_neg):
        from .. import ff_loss, sffa_loss, symba_loss

        if loss == "ff":
            return ff_loss(h_pos, h_neg, threshold=FF_PARAMS["ff"], backend=self.name)
        if loss == "symba":
            return symba_loss(h_pos, h_neg, alpha=FF_PARAMS["symba"], backend=self.name)
        return sffa_loss(h_pos, h_neg, backend=self.name)


def make_provider(name: str, *, compile_backend: str = "inductor", compile_dynamic: Optional[bool] = False):
    if not isinstance(name, str) or name not in PROVIDERS:
        raise ValueError(f"provider must be one of {list(PROVIDERS)}, got {name!r}")
    if name == "reference":
        return ReferenceProvider()
    if name == "compile":
        return CompileProvider(compile_backend, compile_dynamic)
    return BackendProvider(name)
