"""benchmarks/sass_report.py's per-class hot-loop accounting on hand-written SASS (no GPU, no
pinned Triton needed): opcode kinds, MMA sizes (including the "DMMA.16x8x16" spelling the SASS
parser splits at the lowercase x), loop selection and the bound verdict."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
S = pytest.importorskip("sass_report")
_aot = pytest.importorskip("ffkern.kernels._aot")

LOOP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R3, R2, R6, R3 ;
        /*0030*/                   FFMA R7, R2, R8, R7 ;
        /*0040*/                   IMAD R4, R9, 0x4, R4 ;
        /*0050*/                   ISETP.GE.AND P0, PT, R4, R10, PT ;
        /*0060*/                   MUFU.EX2 R11, R12 ;
        /*0070*/                   HMMA.1688.F32.TF32 R20, R24, R28, R20 ;
        /*0080*/                   DMMA.16x8x16 R40, R44, R48, R40 ;
        /*0090*/                   WARPGROUP.ARRIVE ;
        /*00a0*/                   HGMMA.64x16x8.F32.TF32 R24, gdesc[UR4], R24 ;
        /*00b0*/              @!P0 BRA `(.L_x_1) ;
        /*00c0*/                   EXIT ;
"""


def test_kinds_and_mma_sizes():
    instructions, labels = _aot.parse_sass(LOOP)
    loops = S._innermost_hot_loops(instructions, labels)
    assert len(loops) == 1
    body = loops[0][1]
    kinds, macs, mma_type, ops = S._kinds(body)
    # the wgmma fence is no MMA; an HGMMA computes one warpgroup's (128 threads') tile
    assert kinds == dict(mma=3, float_fma=2, mufu_ex2=1, integer=2, load_store=1, other=2)
    assert ops == ["DMMA.16x8x16", "HGMMA.64x16x8.F32.TF32", "HMMA.1688.F32.TF32"]
    assert macs == 16 * 8 * 8 / 32 + 16 * 8 * 16 / 32 + 64 * 16 * 8 / 128


def test_bound_is_the_smallest_rate():
    row = S._loop_row(_aot.parse_sass(LOOP)[0][1:10], threads=32, elements_per_trip=32, h_bytes=4)
    rates = row["elements_per_clk_sm"]
    assert row["per_element"]["issued"] == 9
    assert rates["issue"] == pytest.approx(128 / 9, abs=0.01)
    assert rates["load/store"] == pytest.approx(32.0)
    assert row["bound"] == min(rates, key=rates.get)
