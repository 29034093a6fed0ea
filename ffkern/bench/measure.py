"""One measurement inside a worker: build the inputs (several rotated copies), call once (this
compiles, and gives the loss value used to check that providers agree), time, measure memory.

Request fields: kind ("supcon" | "ff"), mode ("fwd" | "fwdbwd"), dtype ("float32" | "bfloat16"),
n (SupCon rows N, or FF elements B*D per tensor), d (features), loss (FF: "ff" | "symba" | "sffa"),
budget_bytes (memory the inputs may take), seed, classes, and the timing settings
(CPU: warmup, repeats, max_call_total_s; GPU: warmup_ms, rep_ms).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch

from .timing import Rotation, cache_bytes, copies_for, peak_cpu, peak_gpu, time_cpu, time_gpu
from .workload import DTYPES, ff_input_bytes, gradient_bytes, supcon_input_bytes


def _inputs(req: Dict, device: torch.device) -> Tuple[List[tuple], Callable, int]:
    """The rotated input copies (tuples of differentiable tensors), the call, the copy count."""
    kind, mode, n, d = req["kind"], req["mode"], int(req["n"]), int(req["d"])
    dtype = DTYPES[req["dtype"]]
    gen = torch.Generator(device=device).manual_seed(int(req.get("seed", 0)))
    grad = mode == "fwdbwd"
    budget = float(req.get("budget_bytes", float("inf")))

    def rows(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype).requires_grad_(grad)

    if kind == "supcon":
        per_copy = supcon_input_bytes(n, d, req["dtype"])
        copies = copies_for(per_copy, cache_bytes(device), budget)
        labels = torch.randint(0, int(req.get("classes", 10)), (n,), generator=gen, device=device)
        inputs = [(rows((n, d)),) for _ in range(copies)]
        return inputs, lambda provider, x: provider.supcon(x, labels), copies
    if kind == "ff":
        if n % d:
            raise ValueError(f"FF size B*D={n} is not a multiple of D={d}")
        per_copy = ff_input_bytes(n, req["dtype"])
        copies = copies_for(per_copy, cache_bytes(device), budget)
        loss = req.get("loss", "ff")
        inputs = [(rows((n // d, d)), rows((n // d, d))) for _ in range(copies)]
        return inputs, lambda provider, hp, hn: provider.pair_loss(loss, hp, hn), copies
    raise ValueError(f"kind must be 'supcon' or 'ff', got {kind!r}")


def measure(provider, device: torch.device, req: Dict) -> Dict:
    if provider is None:
        raise ValueError("this worker was started without a provider")
    inputs, call, copies = _inputs(req, device)
    rot = Rotation(inputs)
    if req["mode"] == "fwd":
        def fn():
            args = rot.next()
            with torch.no_grad():
                return call(provider, *args)
    else:
        def fn():
            args = rot.next()
            return torch.autograd.grad(call(provider, *args), args)

    # First call, untimed: compiles (torch.compile, a JIT-built extension, Triton autotuning) and
    # gives the values the sweep compares across providers.
    args = inputs[0]
    if req["mode"] == "fwd":
        with torch.no_grad():
            value = call(provider, *args)
        grad_norm = None
    else:
        value = call(provider, *args)
        grads = torch.autograd.grad(value, args)
        grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        del grads
    value = float(value.detach())

    if device.type == "cuda":
        timing = time_gpu(fn, warmup_ms=float(req.get("warmup_ms", 25)), rep_ms=float(req.get("rep_ms", 100)))
        mem, mem_method = peak_gpu(fn)
    else:
        timing = time_cpu(fn, warmup=int(req.get("warmup", 1)), repeats=int(req.get("repeats", 5)),
                          max_total_s=req.get("max_call_total_s"))
        mem, mem_method = peak_cpu(fn)
    grad_bytes = gradient_bytes(req["kind"], int(req["n"]), int(req["d"]), req["dtype"], req["mode"])
    return {  # the inputs are released when this returns; the worker then empties the CUDA cache
        "ok": True, "status": "ok", "time_s": timing.median_s, "min_s": min(timing.samples_s), "samples_s": timing.samples_s,
        "timing_method": timing.method, "copies": copies, "mem_bytes": mem, "mem_method": mem_method,
        "mem_beyond_io_bytes": None if mem is None else max(mem - grad_bytes, 0),
        "loss_value": value, "grad_norm": grad_norm,
    }
