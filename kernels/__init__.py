"""The "triton" backend: fused Triton kernels (installed as ffkern.kernels).

marginal_supcon.py  tiled forward (online logsumexp) and symmetric one-sweep backward of SPEC 1
ff_goodness.py      one-pass goodness / FF / SymBa / SFFA forward and backward of SPEC 2
per_class_goodness.py  fused per-class goodness loss of SPEC 2.2 (its operators registered there)
_ops.py             the launchers as operators torch.ops.ffkern_triton::* with autograd (so that
                    torch.compile(fullgraph=True) treats them as opaque calls)
Importing this module imports triton; ffkern itself imports it only when the backend is used.
"""
from __future__ import annotations

import torch

from ffkern.per_class import kernel_scale
from ffkern.reference import row_scale

from . import _ops, marginal_supcon, per_class_goodness  # noqa: F401 (registers the operators)
from ._launch import unavailable_reason

_OPS = torch.ops.ffkern_triton


class TritonBackend:
    name = "triton"
    supcon_forward = staticmethod(marginal_supcon.supcon_forward)
    supcon_backward = staticmethod(marginal_supcon.supcon_backward)

    def unavailable_reason(self, device):
        return unavailable_reason(device)

    def supcon_rows(self, x, labels, temperature, margin, normalize):
        """x is normalized inside the kernels (from its row norms): memory beyond the inputs is the
        per-row statistics (norm, lse, |P|) only; backward recomputes the tiles."""
        x = x.contiguous()
        stat = torch.float64 if x.dtype == torch.float64 else torch.float32
        norm = None
        if normalize:
            # huge rows scaled by a power of two (exact; 1 for ordinary rows: the same bits), as the
            # reference does, so that neither their norm nor the kernels' raw products overflow
            x = x * row_scale(x).to(x.dtype)
            norm = torch.linalg.vector_norm(x, dim=1, dtype=stat)
        labels = marginal_supcon.kernel_labels(labels)
        loss, _lse, num_pos, num_clipped = _OPS.supcon_rows(x, labels, norm, float(temperature), float(margin))
        return loss, num_pos, num_clipped

    def goodness(self, h, kind, skip_tokens):
        return _OPS.goodness(h, kind, int(skip_tokens))

    def pair_loss(self, loss, h_pos, h_neg, param, kind, skip_tokens, activity_term=False):
        """SFFA's activity factor (activity_term) is fused into the kernels (kernels/ff_goodness.py)."""
        param = 0.0 if param is None else float(param)  # sffa has no parameter
        return _OPS.pair_loss(h_pos, h_neg, loss, param, kind, int(skip_tokens), bool(activity_term))[0]

    def class_goodness(self, h, weight, bias):
        return _OPS.class_goodness(h, weight.reshape(weight.shape[0], -1), bias)

    def per_class_loss(self, h, weight, labels, bias, scale, reduction):
        return _OPS.per_class_loss(h, weight.reshape(weight.shape[0], -1), labels.contiguous(), bias,
                                   kernel_scale(scale, h), reduction)[0]
