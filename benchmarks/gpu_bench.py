"""The benchmark step of benchmarks/gpu_check.sh: the few GPU figures a short GPU session takes.

  python benchmarks/gpu_bench.py --out DIR [--time-budget S] [--dry-run]

  1. matmul_bf16   the device's bf16 matrix-product rate (torch.matmul, 8192^3): the ceiling
  2. supcon_large  marginal SupCon forward+backward of the fused backends at N = 65536, D = 128,
                   bf16: 6 N^2 D flops, as a fraction of matmul_bf16
  3. supcon_small  forward+backward at the paper's size, N = 1024, D = 128, float32 and bfloat16:
                   triton and cpp against the eager reference and torch.compile of it
  4. largest_n     per fused backend, N doubled from 65536 while the next size fits the budget
Writes DIR/bench.json and DIR/bench.txt and exits non-zero if any measurement failed (an error
or a loss that disagrees with the reference); a provider that cannot run here is a skip with its
reason, not a failure. The steps run in that order (most wanted first) and each checks the time
budget before it starts, so a slow step costs the later ones, never the deadline.

Timing: CUDA events around each call after warm-up calls (which also compile), median of a few
repeats; on the CPU (dry run) perf_counter. Peak memory: torch.cuda.max_memory_allocated beyond
what was allocated before the call. --dry-run: tiny sizes on the CPU (Triton under
TRITON_INTERPRET=1, torch.compile with the aot_eager backend, whose inductor C++ build would take a
minute here, no cpp: its extension is not built in a dry run), to check this script, not to
measure anything.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by the backend)

import torch  # noqa: E402

import ffkern  # noqa: E402
from ffkern import _backend  # noqa: E402
from ffkern.bench.devinfo import device_info  # noqa: E402
from ffkern.bench.providers import MARGIN, TEMPERATURE, make_provider  # noqa: E402

SIZES = {
    # n_small: the CFF paper's batch (512 samples x 2 views); n_large: the issue's rate point
    "gpu": dict(n_small=1024, n_large=65536, max_n=1 << 20, d=128, matmul_n=8192, warmup=3, repeats=10,
                large_warmup=2, large_repeats=5, compile_backend="inductor"),
    "dry": dict(n_small=64, n_large=128, max_n=512, d=32, matmul_n=256, warmup=1, repeats=2,
                large_warmup=1, large_repeats=2, compile_backend="aot_eager"),
}
FUSED = ("triton", "cpp")
PROVIDERS = ("triton", "cpp", "reference", "compile")
# loss agreement with the eager reference at N = 1024 (float32 math on both sides for bf16 input)
AGREE_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
NEXT_SIZE_FACTOR = 4.2  # doubling N quadruples the pair work, plus a margin


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup: int, repeats: int):
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones, every sample, the last
    call's output, and (CUDA) the peak memory of the timed calls beyond what was allocated before
    them. Each call's output is dropped before the next call, so the peak is one call's."""
    for _ in range(warmup):
        fn()
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    samples, out = [], None
    for _ in range(repeats):
        out = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            samples.append(time.perf_counter() - t0)
    peak = int(torch.cuda.max_memory_allocated(device) - before) if cuda else None
    return statistics.median(samples), samples, out, peak


def supcon_fn(provider: str, compile_backend: str):
    """The provider's loss as a function of (x, labels), with the benchmark's tau and margin."""
    if provider == "reference":
        return make_provider("reference").supcon
    if provider == "compile":
        return make_provider("compile", compile_backend=compile_backend).supcon

    def fused(x, labels):
        return ffkern.marginal_supcon_loss(x, labels, temperature=TEMPERATURE, margin=MARGIN, backend=provider)

    return fused


def unavailable(provider: str, device, dry_run: bool):
    if provider == "cpp" and dry_run:
        return "dry run: the cpp extension is not built in a dry run"
    if provider not in FUSED:
        return None
    try:
        _backend.resolve(provider, device)
    except Exception as exc:  # BackendUnavailable, or a backend that failed to import
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    return None


def inputs(n, d, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, device=device, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, 100, (n,), device=device, generator=gen)  # ~N/100 positives per anchor
    return x, labels


def fwd_bwd(loss_fn, x, labels):
    def call():
        loss = loss_fn(x, labels)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    return call


def measure(entry, loss_fn, x, labels, device, warmup, repeats):
    """Fills entry with the time, rate, loss and peak memory of forward+backward."""
    median, samples, (loss, _grad), peak = time_calls(fwd_bwd(loss_fn, x, labels), device, warmup, max(1, repeats))
    n, d = x.shape
    entry.update(status="ok", time_s=median, samples_s=samples, loss=float(loss), flops=6.0 * n * n * d,
                 tflops=6.0 * n * n * d / median / 1e12, peak_extra_bytes=peak)


def run_guarded(entry, failures, what, fn):
    """Runs fn(); an exception becomes the entry's status and reason, and (unless it is running out
    of GPU memory, which answers "how large can N be") a failure."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one failed measurement is recorded, the rest go on
        oom = isinstance(exc, torch.cuda.OutOfMemoryError)
        entry.update(status="oom" if oom else "error", reason=f"{type(exc).__name__}: {str(exc).strip()[:500]}")
        if not oom:
            entry["traceback"] = traceback.format_exc(limit=6)
            failures.append(f"{what}: {entry['reason']}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def matmul_rate(device, n, dtype, warmup, repeats):
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    median, samples, _, _ = time_calls(lambda: torch.matmul(a, b, out=out), device, warmup, repeats)
    return {"status": "ok", "what": f"torch.matmul {n}x{n} @ {n}x{n} {str(dtype).replace('torch.', '')}",
            "flops": 2.0 * n ** 3, "time_s": median, "samples_s": samples, "flop_per_s": 2.0 * n ** 3 / median}


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "ffkern": ffkern.__version__, "ffkern_path": str(Path(ffkern.__file__).parent)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        root = Path(__file__).resolve().parent.parent
        out["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def run(args) -> dict:
    dry = args.dry_run
    sizes = dict(SIZES["dry" if dry else "gpu"])
    device = torch.device("cpu" if dry else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device visible (use --dry-run to rehearse on the CPU)")
    budget = Budget(args.time_budget)
    started = time.time()
    failures: list = []
    result = {"meta": {"dry_run": dry, "device": device_info(device), "versions": versions(), "sizes": sizes,
                       "temperature": TEMPERATURE, "margin": MARGIN, "time_budget_s": args.time_budget,
                       "fp32_matmul_precision": torch.get_float32_matmul_precision(),
                       "timing": ("CUDA events, median of repeats after warm-up calls" if device.type == "cuda"
                                  else "time.perf_counter, median of repeats after warm-up calls"),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))},
              "failures": failures}
    reasons = {p: unavailable(p, device, dry) for p in PROVIDERS}
    d = sizes["d"]

    # 1. the ceiling
    entry = {"status": "skipped"}
    run_guarded(entry, failures, "matmul_bf16", lambda: entry.update(
        matmul_rate(device, sizes["matmul_n"], torch.bfloat16, sizes["warmup"], sizes["repeats"])))
    result["matmul_bf16"] = entry
    ceiling = entry.get("flop_per_s")

    # 2. the rate point of the fused backends
    result["supcon_large"] = []
    for provider in FUSED:
        entry = {"provider": provider, "dtype": "bfloat16", "n": sizes["n_large"], "d": d, "status": "skipped"}
        result["supcon_large"].append(entry)
        if reasons[provider]:
            entry["reason"] = reasons[provider]
            continue
        if budget.left() < 20:
            entry["reason"] = "out of time budget"
            continue

        def large(entry=entry, provider=provider):
            x, labels = inputs(sizes["n_large"], d, torch.bfloat16, device)
            measure(entry, supcon_fn(provider, sizes["compile_backend"]), x, labels, device,
                    sizes["large_warmup"], sizes["large_repeats"])
            if ceiling:
                entry["fraction_of_matmul_bf16"] = entry["tflops"] * 1e12 / ceiling

        run_guarded(entry, failures, f"supcon_large {provider}", large)

    # 3. the paper's size against the reference and torch.compile of it
    result["supcon_small"] = []
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        x, labels = inputs(sizes["n_small"], d, dtype, device, seed=1)
        ref_loss = None
        rows = []
        for provider in ("reference", "compile", "triton", "cpp"):
            entry = {"provider": provider, "dtype": dtype_name, "n": sizes["n_small"], "d": d, "status": "skipped"}
            rows.append(entry)
            if reasons[provider]:
                entry["reason"] = reasons[provider]
                continue
            if budget.left() < (60 if provider == "compile" and not dry else 10):
                entry["reason"] = "out of time budget"
                continue
            if provider == "compile":
                entry["compile_backend"] = sizes["compile_backend"]
            run_guarded(entry, failures, f"supcon_small {provider} {dtype_name}",
                        lambda entry=entry, provider=provider: measure(
                            entry, supcon_fn(provider, sizes["compile_backend"]), x, labels, device,
                            sizes["warmup"], sizes["repeats"]))
            if provider == "reference" and entry["status"] == "ok":
                ref_loss = entry["loss"]
            if entry["status"] == "ok" and ref_loss is not None and provider != "reference":
                diff = abs(entry["loss"] - ref_loss) / max(abs(ref_loss), 1e-30)
                entry["loss_rel_diff_vs_reference"] = diff
                if not diff <= AGREE_TOL[dtype_name]:
                    entry["status"] = "wrong"
                    failures.append(f"supcon_small {provider} {dtype_name}: loss {entry['loss']!r} vs the "
                                    f"reference's {ref_loss!r} (relative difference {diff:.3g})")
        times = {e["provider"]: e.get("time_s") for e in rows if e["status"] == "ok"}
        for e in rows:
            if e["status"] == "ok" and e["provider"] in FUSED:
                for base in ("reference", "compile"):
                    if times.get(base):
                        e[f"speedup_vs_{base}"] = times[base] / e["time_s"]
        result["supcon_small"].extend(rows)
        del x, labels

    # 4. the largest N that runs, within what is left (shared between the fused backends)
    result["largest_n"] = []
    runnable = [p for p in FUSED if not reasons[p]]
    for provider in FUSED:
        summary = {"provider": provider, "dtype": "bfloat16", "d": d, "largest_n": None, "runs": []}
        result["largest_n"].append(summary)
        if reasons[provider]:
            summary.update(status="skipped", reason=reasons[provider])
            continue
        share = budget.left() / max(1, len(runnable) - runnable.index(provider))
        stop_at = time.monotonic() + share - 5
        n = sizes["n_large"]
        last = None
        summary["status"] = "ok"
        while n <= sizes["max_n"]:
            if last is None and stop_at - time.monotonic() < 5:
                summary["stopped"] = "out of time budget"
                break
            if last is not None and last * NEXT_SIZE_FACTOR > stop_at - time.monotonic():
                summary["stopped"] = (f"N={n} would take about {last * NEXT_SIZE_FACTOR:.1f} s, more than the "
                                      f"{max(0.0, stop_at - time.monotonic()):.1f} s left to this backend")
                break
            entry = {"n": n, "status": "skipped"}
            summary["runs"].append(entry)

            def one(entry=entry, n=n, provider=provider):
                x, labels = inputs(n, d, torch.bfloat16, device, seed=2)
                # one timed call; the kernels were compiled at n_large (the same specialization)
                measure(entry, supcon_fn(provider, sizes["compile_backend"]), x, labels, device, 0, 1)

            run_guarded(entry, failures, f"largest_n {provider} N={n}", one)
            if entry["status"] != "ok":
                summary["stopped"] = f"N={n}: {entry['status']} ({entry.get('reason', '')})"
                break
            summary["largest_n"], last = n, entry["time_s"]
            n *= 2
        else:
            summary["stopped"] = f"reached the bound N={sizes['max_n']}"

    result["meta"]["wall_s"] = time.time() - started
    return result


def fmt_time(seconds):
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(result) -> str:
    meta = result["meta"]
    dev, ver = meta["device"], meta["versions"]
    lines = [f"gpu_bench: {dev.get('name')} | torch {ver['torch']} (CUDA {ver['torch_cuda']}) | triton {ver['triton']}"
             f" | ffkern {ver.get('git_commit') or ver['ffkern']}" + (" | DRY RUN (CPU, tiny sizes)" if meta["dry_run"] else ""),
             f"{meta['timing']}; SupCon tau={meta['temperature']} m={meta['margin']}, fwd+bwd = 6 N^2 D flops", ""]
    mm = result["matmul_bf16"]
    if mm.get("status") == "ok":
        lines.append(f"ceiling: {mm['what']}: {mm['flop_per_s'] / 1e12:.4g} TFLOP/s ({fmt_time(mm['time_s'])})")
    else:
        lines.append(f"ceiling: matmul bf16 {mm.get('status')}: {mm.get('reason', '')}")

    lines += ["", "SupCon fwd+bwd, bfloat16, rate point"]
    lines.append(f"  {'provider':<10}{'N':>8}{'D':>5}{'time':>13}{'TFLOP/s':>10}{'of matmul':>11}{'peak extra':>12}  note")
    for e in result["supcon_large"]:
        lines.append(_row(e, e["n"]))

    lines += ["", "SupCon fwd+bwd at the paper's size"]
    lines.append(f"  {'provider':<10}{'dtype':>9}{'N':>6}{'time':>13}{'vs ref':>9}{'vs compile':>11}{'loss diff':>11}  note")
    for e in result["supcon_small"]:
        note = e.get("reason", "") if e["status"] != "ok" else (e.get("compile_backend", "") or "")
        if e["status"] not in ("ok", "skipped"):
            note = f"{e['status'].upper()}: {note}"
        lines.append(f"  {e['provider']:<10}{e['dtype']:>9}{e['n']:>6}{fmt_time(e.get('time_s')):>13}"
                     f"{_x(e.get('speedup_vs_reference')):>9}{_x(e.get('speedup_vs_compile')):>11}"
                     f"{_g(e.get('loss_rel_diff_vs_reference')):>11}  {note}")

    lines += ["", "Largest N that runs (bfloat16 fwd+bwd, one call each)"]
    for s in result["largest_n"]:
        if s.get("status") == "skipped":
            lines.append(f"  {s['provider']:<10} skipped: {s.get('reason', '')}")
            continue
        runs = ", ".join(f"N={r['n']}: {fmt_time(r.get('time_s')) if r['status'] == 'ok' else r['status']}"
                         for r in s["runs"])
        lines.append(f"  {s['provider']:<10} largest N = {s['largest_n']} ({runs}); {s.get('stopped', '')}")

    lines += ["", f"failures: {len(result['failures'])}"] + [f"  {f}" for f in result["failures"]]
    lines.append(f"wall time {result['meta']['wall_s']:.1f} s")
    return "\n".join(lines) + "\n"


def _row(e, n):
    if e["status"] != "ok":
        return f"  {e['provider']:<10}{n:>8}{e['d']:>5}{'-':>13}{'-':>10}{'-':>11}{'-':>12}  {e['status']}: {e.get('reason', '')}"
    peak = e.get("peak_extra_bytes")
    frac = e.get("fraction_of_matmul_bf16")
    return (f"  {e['provider']:<10}{n:>8}{e['d']:>5}{fmt_time(e['time_s']):>13}{e['tflops']:>10.3g}"
            f"{(f'{100 * frac:.3g}%' if frac is not None else '-'):>11}{(f'{peak / 2**20:.0f} MiB' if peak is not None else '-'):>12}")


def _x(v):
    return f"{v:.3g}x" if v is not None else "-"


def _g(v):
    return f"{v:.1e}" if v is not None else "-"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for bench.json and bench.txt")
    p.add_argument("--time-budget", type=float, default=150.0, help="seconds; later steps are skipped past it")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the script)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = table(result)
    (out / "bench.txt").write_text(text)
    print(text, end="")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
