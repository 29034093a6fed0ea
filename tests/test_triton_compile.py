"""The Triton kernels compile for real GPUs with the launchers' exact launches (recorded from the
real launchers, specialized as a GPU launch would be), without spills, within shared memory:
under the Triton CI resolves (sm_80 and sm_90) and under the GPU machines' pinned Triton 3.6.0
(sm_90, in its own environment: benchmarks/gpu_toolchain.py). The interpreter cannot show any of it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ffkern import _backend

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "triton_compile_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_toolchain  # noqa: E402

MIN_CONFIGS = 80  # every SupCon and FF configuration of all_launch_cases()
PER_CLASS_CONFIGS = 36  # kernels/per_class_goodness.py's aot_launch_cases(): 3 shapes x 3 dtypes x 2 layouts x 2
SFFA_ACTIVITY_CONFIGS = 8  # triton_compile_check.sffa_activity_launch_cases(): 4 dtypes x forward, backward


def _run_checks(jobs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([str(python), str(SCRIPT), cap], env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for python, cap in jobs]
    outputs = [p.communicate(timeout=1500)[0] for p in procs]
    for (python, cap), proc, out in zip(jobs, procs, outputs):
        assert proc.returncode == 0, f"{python} sm_{cap}:\n{out}"
        assert out.count(" ok\n") >= MIN_CONFIGS + PER_CLASS_CONFIGS + SFFA_ACTIVITY_CONFIGS, out
        assert sum(1 for line in out.splitlines() if " sffa-activity: " in line and line.endswith(" ok")) \
            == SFFA_ACTIVITY_CONFIGS, out
        assert sum(1 for line in out.splitlines() if " per_class " in line and line.endswith(" ok")) == PER_CLASS_CONFIGS, out


@pytest.mark.skipif(not _backend.triton_importable(), reason="triton is not installed")
def test_kernels_compile_under_ci_triton():
    _run_checks([(sys.executable, "80"), (sys.executable, "90")])


@pytest.mark.skipif(not _backend.triton_importable(), reason="triton is not installed")
def test_kernels_compile_under_the_gpu_machines_triton():
    _run_checks([(gpu_toolchain.ensure_env(), "90")])
