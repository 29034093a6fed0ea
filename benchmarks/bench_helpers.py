"""Helpers of the pytest-benchmark microbenchmarks (``pytest benchmarks --benchmark-only``).

Small sizes on the CPU, larger ones on a GPU. A provider that cannot run here is a skip whose
reason says why (e.g. triton without CUDA). The sweep with ceilings, plots and memory is
``ffkern bench``; these are for quick before/after comparisons (``--benchmark-compare``).
"""
import pytest
import torch

from ffkern.bench.providers import make_provider

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
_providers = {}


def provider_or_skip(name: str):
    if name not in _providers:
        prov = make_provider(name)
        _providers[name] = (prov, prov.unavailable_reason(DEVICE))
    prov, why = _providers[name]
    if why:
        pytest.skip(f"{name} on {DEVICE.type}: {why}")
    return prov


def synchronized(fn):
    """The benchmarked callable: on a GPU it waits for the kernels, so the clock sees them."""
    if not ON_GPU:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run

