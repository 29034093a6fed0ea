"""The Triton kernels compile for real GPUs (sm_80, sm_90) with the launchers' configurations and
fit in shared memory: checked ahead of time without a GPU, which the interpreter cannot show."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ffkern import _backend

SCRIPT = Path(__file__).with_name("triton_compile_check.py")


@pytest.mark.skipif(not _backend.triton_importable(), reason="triton is not installed")
def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), cap], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for cap in ("80", "90")]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    report = "\n".join(outputs)
    assert all(p.returncode == 0 for p in procs), report
    assert report.count("shared") >= 2 * 42, report  # every configuration of both capabilities
