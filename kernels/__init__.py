"""The "triton" backend: fused Triton kernels (installed as ffkern.kernels).

marginal_supcon.py  tiled forward (online logsumexp) and symmetric one-sweep backward of SPEC 1
ff_goodness.py      one-pass goodness / FF / SymBa / SFFA forward and backward of SPEC 2
Importing this module imports triton; ffkern itself imports it only when the backend is used.
"""
from __future__ import annotations

from . import ff_goodness, marginal_supcon
from ._launch import unavailable_reason


class TritonBackend:
    name = "triton"
    supcon_forward = staticmethod(marginal_supcon.supcon_forward)
    supcon_backward = staticmethod(marginal_supcon.supcon_backward)

    def unavailable_reason(self, device):
        return unavailable_reason(device)

    def supcon_rows(self, x, labels, temperature, margin, normalize):
        return marginal_supcon.MarginalSupConRows.apply(x, labels, temperature, margin, normalize)

    def goodness(self, h, kind, skip_tokens):
        return ff_goodness.goodness(h, kind, skip_tokens)

    def pair_loss(self, loss, h_pos, h_neg, param, kind, skip_tokens):
        return ff_goodness.pair_loss(loss, h_pos, h_neg, param, kind, skip_tokens)
