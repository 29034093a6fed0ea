"""Shared test setup: which backends and devices the conformance suite runs on.

Without CUDA, Triton kernels run under TRITON_INTERPRET=1 (numpy on the CPU); it must be set
before triton is imported, so it is set here, at collection time, unless the caller chose.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ffkern import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds even on a GPU (deselect with -m 'not slow')")
    # pytest-xdist's marker (tests/test_gpu.py keeps its tens-of-GB tests on one worker with
    # --dist loadgroup); registered here too, so that runs without xdist do not warn about it
    config.addinivalue_line("markers", "xdist_group(name): run in the same pytest-xdist worker as the group")


def backend_cases():
    """(backend, device) pairs: every registered backend on every device it can run on here.
    A pair that cannot run is kept as a skip whose reason says why, so nothing hides.

    Except cpp on CUDA: where a CUDA device exists, the extension must build with its CUDA
    kernels, so that pair is never skipped. If it cannot run, the test body's resolve() raises
    BackendUnavailable with the compiler's message: a failure, not a quiet skip."""
    cases = []
    for name in _backend.BACKENDS:
        for device in DEVICES:
            if name == "reference" and device == "cuda":
                continue  # the reference is the ground truth; it is computed on the CPU in float64
            reason = None
            if name == "triton" and not _backend.triton_importable():
                reason = "triton is not installed"
            else:
                try:
                    reason = _backend._instance(name).unavailable_reason(torch.device(device))
                except Exception as exc:  # e.g. a compiled backend that failed to build
                    reason = f"{name} failed to load: {exc}"
            must_run = name == "cpp" and device == "cuda"  # "cuda" is in DEVICES only where CUDA is available
            marks = [pytest.mark.skip(reason=f"{name} on {device}: {reason}")] if reason and not must_run else []
            cases.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return cases


@pytest.fixture
def highest_precision():
    """fp32 products in IEEE fp32 (no TF32) so fp32 results can be compared tightly."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)
