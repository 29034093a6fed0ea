"""The device's own limits, measured at the start of every run; kernels are reported as a
fraction of them (a datasheet peak is never used as a ceiling).

GPU: a large bf16 matrix product, the same in fp32 with TF32 tensor cores allowed and in IEEE
fp32 (SIMT), and a large device-to-device copy. CPU: fp32 and bf16 matrix products and a large
memory copy. A product of n x n matrices counts 2 n^3 flops; a copy of S bytes counts 2 S bytes
(read plus written), the same convention as the FF losses' byte counts.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .timing import time_cpu, time_gpu


def _timer(device: torch.device, quick: bool) -> Callable:
    if device.type == "cuda":
        return lambda fn: time_gpu(fn, warmup_ms=25, rep_ms=50 if quick else 200)
    return lambda fn: time_cpu(fn, warmup=1, repeats=3 if quick else 7)


def _matmul(device, dtype, n, timer, precision: Optional[str] = None) -> Dict:
    old = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        c = torch.empty(n, n, device=device, dtype=dtype)
        t = timer(lambda: torch.matmul(a, b, out=c))
    finally:
        torch.set_float32_matmul_precision(old)
    flops = 2.0 * n ** 3
    what = f"{n}x{n} @ {n}x{n} {str(dtype).replace('torch.', '')}"
    if precision is not None:
        what += f", float32_matmul_precision={precision!r}"
    return {"value": flops / t.median_s, "unit": "flop/s", "what": what, "time_s": t.median_s, "method": t.method}


def _copy(device, nbytes, timer) -> Dict:
    n = nbytes // 4
    src = torch.ones(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return {"value": 2.0 * n * 4 / t.median_s, "unit": "B/s",
            "what": f"copy of {n * 4 / 2**20:.0f} MiB (bytes read + written)", "time_s": t.median_s, "method": t.method}


def measure_ceilings(device: torch.device, quick: bool = False) -> Dict[str, Dict]:
    timer = _timer(device, quick)
    if device.type == "cuda":
        n = 4096 if quick else 8192
        out = {
            "matmul_bf16": _matmul(device, torch.bfloat16, n, timer),
            "matmul_tf32": _matmul(device, torch.float32, n, timer, precision="high"),
            "matmul_fp32": _matmul(device, torch.float32, n, timer, precision="highest"),
            "copy": _copy(device, (256 << 20) if quick else (2 << 30), timer),
        }
        torch.cuda.empty_cache()
        return out
    n = 1024 if quick else 2048
    return {
        "matmul_fp32": _matmul(device, torch.float32, n, timer, precision="highest"),
        "matmul_bf16": _matmul(device, torch.bfloat16, n, timer),
        "copy": _copy(device, (128 << 20) if quick else (512 << 20), timer),
    }


def ceiling_key(kind: str, dtype: str, device_type: str, fp32_precision: str) -> str:
    """Which ceiling a measurement is a fraction of."""
    if kind == "ff":
        return "copy"
    if dtype == "bfloat16":
        return "matmul_bf16"
    if device_type == "cuda" and fp32_precision != "highest":
        return "matmul_tf32"  # fp32 products may use TF32 tensor cores (ffkern.kernels follows this setting)
    return "matmul_fp32"
