"""FF goodness losses (ff, symba, sffa), forward+backward, per provider."""
import pytest
import torch

from bench_helpers import DEVICE, ON_GPU, provider_or_skip, synchronized
from ffkern.bench.providers import FF_LOSSES, PROVIDERS
from ffkern.bench.workload import ff_bytes

SIZES = (2 ** 20, 2 ** 26) if ON_GPU else (2 ** 16, 2 ** 20)
D = 1024


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"2^{s.bit_length() - 1}")
@pytest.mark.parametrize("loss", FF_LOSSES)
@pytest.mark.parametrize("name", PROVIDERS)
def test_ff_fwdbwd(benchmark, name, loss, size):
    prov = provider_or_skip(name)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    h_pos = torch.randn(size // D, D, generator=gen, device=DEVICE, requires_grad=True)
    h_neg = torch.randn(size // D, D, generator=gen, device=DEVICE, requires_grad=True)

    def fn():
        return torch.autograd.grad(prov.pair_loss(loss, h_pos, h_neg), (h_pos, h_neg))

    fn()
    benchmark.extra_info.update(bytes=ff_bytes(size, "float32", "fwdbwd"), device=str(DEVICE))
    benchmark(synchronized(fn))
