"""Marginal SupCon, forward and forward+backward, per provider."""
import pytest
import torch

from bench_helpers import DEVICE, ON_GPU, provider_or_skip, synchronized
from ffkern.bench.providers import PROVIDERS
from ffkern.bench.workload import supcon_flops

SIZES = (1024, 8192) if ON_GPU else (256, 1024)
DTYPES = (torch.float32, torch.bfloat16) if ON_GPU else (torch.float32,)
D = 128


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("mode", ("fwd", "fwdbwd"))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", PROVIDERS)
def test_supcon(benchmark, name, n, mode, dtype):
    prov = provider_or_skip(name)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(n, D, generator=gen, device=DEVICE).to(dtype).requires_grad_(mode == "fwdbwd")
    labels = torch.randint(0, 10, (n,), generator=gen, device=DEVICE)

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return prov.supcon(x, labels)
    else:
        def fn():
            return torch.autograd.grad(prov.supcon(x, labels), x)

    fn()  # compiles (torch.compile, Triton) outside the measurement
    benchmark.extra_info.update(flops=supcon_flops(n, D, mode), device=str(DEVICE))
    benchmark(synchronized(fn))
