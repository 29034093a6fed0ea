"""Compiles every Triton kernel configuration the launchers use on a GPU, ahead of time, for
sm_80 and sm_90, without a GPU: the real launchers run on CPU tensors under
ffkern.kernels._launch.record_launches, and each recorded launch is compiled to cubin with the
exact specialization a GPU launch would get (kernels/_aot.py). This catches what the interpreter
cannot: GPU-only compile errors, spills, shared memory beyond the device limit.

Run as a script without TRITON_INTERPRET (the test does, under CI's Triton and under the GPU
machines' pinned Triton): prints one line per configuration, exits 1 if any fails.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

from ffkern.kernels import _aot, per_class_goodness  # noqa: E402


def sffa_activity_launch_cases():
    """SFFA with its fused activity factor: the ACTIVITY variants of the FF forward and backward
    kernels (_aot.all_launch_cases records the plain losses), on ff_launches' [4096, 1024] shape."""
    import torch

    from ffkern.kernels import ff_goodness as FG

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        h = torch.zeros(4096, 1024, dtype=dtype)

        def run():
            _, coef, split, _ = FG.forward(FG.SFFA, h, h, 0.0, "mean", 0, activity=True)
            FG.backward(h, coef[0], coef[1], torch.ones(2, dtype=coef.dtype), 0, split, activity=True)

        for launch_ in _aot._record(run):
            yield f"ff {launch_.name} {str(dtype)[6:]} sffa-activity", launch_


def launch_cases():
    """Every recorded launch: kernels/_aot.py's (SupCon, FF), SFFA's activity variants and the
    per-class loss's."""
    yield from _aot.all_launch_cases()
    yield from sffa_activity_launch_cases()
    yield from per_class_goodness.aot_launch_cases()


# The GPU machines' architecture: spills fail there. On sm_80 they are reported, not failed (the
# tiles are chosen for sm_90; ptxas for sm_80 spills a few bytes in two FF configurations).
SPILL_FREE = (90,)


def main(capabilities):
    failures = 0
    for capability in capabilities:
        for what, launch in launch_cases():
            try:
                compiled = _aot.compile_launch(launch, capability)
                res = _aot.ptxas_resources(compiled, capability)
                problems = []
                if res.shared > _aot.SHARED_LIMIT[capability]:
                    problems.append("SHARED MEMORY OVER THE LIMIT")
                if (res.spill_stores or res.spill_loads) and capability in SPILL_FREE:
                    problems.append("SPILLS")
                if "float64" in what and "fp32" in _aot.signature_of(launch, capability).values():
                    problems.append("FP32 SCALAR IN A FLOAT64 KERNEL")
                print(f"sm_{capability} {what}: regs {res.registers} spill {res.spill_stores}/{res.spill_loads} B "
                      f"shared {res.shared} B ctas/SM {res.ctas_per_sm} {' '.join(problems) or 'ok'}", flush=True)
                failures += bool(problems)
            except Exception as exc:  # report every configuration, then fail
                print(f"sm_{capability} {what}: FAILED {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
                failures += 1
    print(f"triton {triton.__version__}: {failures} failing configuration(s)")
    return failures


if __name__ == "__main__":
    caps = [int(c) for c in sys.argv[1:]] or [80, 90]
    sys.exit(1 if main(caps) else 0)
