"""Margin schedules (SPEC 3): endpoints, shapes between them, and argument errors."""
import math

import pytest

from ffkern.train.schedules import SCHEDULES, margin_schedule


@pytest.mark.parametrize("kind", ["linear", "parabolic", "cosine", "exponential"])
def test_endpoints_and_monotone(kind):
    m = margin_schedule(kind, 6, 0.4, 0.1)
    assert len(m) == 6
    assert m[0] == pytest.approx(0.4) and m[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(m, m[1:])), m  # strictly decreasing from m0 to mL


def test_linear_is_the_papers_linspace():
    assert margin_schedule("linear", 4) == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert margin_schedule("linear", 3, 0.1, 0.4) == pytest.approx([0.1, 0.25, 0.4])  # increasing also allowed


def test_shapes_between_the_ends():
    # t = 1/2 of a 3-layer net: each schedule's own formula
    assert margin_schedule("parabolic", 3)[1] == pytest.approx(0.1 + 0.3 * 0.25)
    assert margin_schedule("cosine", 3)[1] == pytest.approx(0.25)
    assert margin_schedule("exponential", 3)[1] == pytest.approx(math.sqrt(0.4 * 0.1))
    assert margin_schedule("constant", 3, 0.3, 0.1) == [0.3, 0.3, 0.3]


def test_cff_codes_forms_and_exponent():
    # CFF's parabolic mL + (m0 - mL)(1 - s)^(2k): 0.40/0.27/0.18/0.12/0.10 for 5 layers (issue 12)
    assert margin_schedule("parabolic", 5) == pytest.approx([0.4, 0.26875, 0.175, 0.11875, 0.1])
    assert margin_schedule("parabolic", 3, k=2)[1] == pytest.approx(0.1 + 0.3 * 0.5 ** 4)
    assert margin_schedule("exponential", 3, k=2)[1] == pytest.approx(0.4 * 0.25 ** 0.25)  # m0 (mL/m0)^(s^k)
    assert margin_schedule("cosine", 3, k=2)[1] == pytest.approx(0.1 + 0.15 * (1 + math.cos(math.pi / 4)))
    assert margin_schedule("linear", 4, k=3) == margin_schedule("linear", 4)  # linear takes no exponent
    for kind in ("parabolic", "cosine", "exponential"):
        m = margin_schedule(kind, 6, k=0.5)
        assert m[0] == pytest.approx(0.4) and m[-1] == pytest.approx(0.1)


def test_single_layer_gets_m0():
    for kind in SCHEDULES:
        assert margin_schedule(kind, 1, 0.5, 0.2) == [0.5]


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        margin_schedule("quadratic", 3)
    with pytest.raises(ValueError, match="num_layers"):
        margin_schedule("linear", 0)
    with pytest.raises(TypeError, match="num_layers"):
        margin_schedule("linear", 2.0)
    with pytest.raises(ValueError, match="m0"):
        margin_schedule("linear", 3, m0=2.5)
    with pytest.raises(ValueError, match="mL"):
        margin_schedule("linear", 3, mL=-0.1)
    with pytest.raises(ValueError, match="k must be > 0"):
        margin_schedule("parabolic", 3, k=0.0)
    with pytest.raises(ValueError, match="exponential"):
        margin_schedule("exponential", 3, 0.4, 0.0)
