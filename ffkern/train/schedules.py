"""Per-layer margin schedules for CFF's marginal loss (SPEC 3).

The margin decreases from m0 at the first layer to mL at the last: early layers, which see only
low-level features, are asked for less same-class closeness than the last ones. With s = l/(L-1)
the layer's position in [0, 1] (s = 0 for a single layer) and CFF's exponent k > 0 (default 1),
the forms of the CFF code:

  linear       m0 + (mL - m0) s                       (the paper's choice: m0 = 0.4, mL = 0.1; no k)
  parabolic    mL + (m0 - mL) (1 - s)^(2k)            (falls fast, then flattens near mL)
  cosine       mL + (m0 - mL) (1 + cos(pi s^k)) / 2   (flat at both ends)
  exponential  m0 (mL / m0)^(s^k)                      (geometric for k = 1; needs m0, mL > 0)
  constant     m0 for every layer

For 5 layers, 0.4 -> 0.1, k = 1, parabolic gives 0.400, 0.269, 0.175, 0.119, 0.100. (The CFF code's
exponential hard-codes the end value 0.1; here it is mL.)
"""
from __future__ import annotations

import math
from typing import List

from .._checks import check_choice, check_number

SCHEDULES = ("linear", "parabolic", "cosine", "exponential", "constant")


def margin_schedule(kind: str, num_layers: int, m0: float = 0.4, mL: float = 0.1, k: float = 1.0) -> List[float]:
    """Margins of layers 0 .. num_layers-1; every value lies in the valid range [0, 2]. ``k``: the
    CFF code's exponent of the parabolic, cosine and exponential forms (linear and constant ignore it)."""
    check_choice("kind", kind, SCHEDULES)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise TypeError(f"num_layers must be an int, got {type(num_layers).__name__}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    m0 = check_number("m0", m0, low=0.0, high=2.0)
    mL = check_number("mL", mL, low=0.0, high=2.0)
    k = check_number("k", k, low=0.0, low_open=True)
    if kind == "exponential" and (m0 == 0.0 or mL == 0.0):
        raise ValueError(f"the exponential schedule needs m0 > 0 and mL > 0, got m0={m0}, mL={mL}")
    out = []
    for layer in range(num_layers):
        s = layer / (num_layers - 1) if num_layers > 1 else 0.0
        if kind == "linear":
            m = m0 + (mL - m0) * s
        elif kind == "parabolic":
            m = mL + (m0 - mL) * (1.0 - s) ** (2.0 * k)
        elif kind == "cosine":
            m = mL + (m0 - mL) * 0.5 * (1.0 + math.cos(math.pi * s ** k))
        elif kind == "exponential":
            m = m0 * (mL / m0) ** (s ** k)
        else:
            m = m0
        out.append(min(max(m, 0.0), 2.0))  # rounding must never leave [0, 2]
    return out
