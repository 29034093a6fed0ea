"""``ffkern bench``: the benchmark suite (registered by ffkern/cli.py).

  ffkern bench --quick                 small ladder, one D, few repeats (a minute or two on a CPU)
  ffkern bench                         the full sweep of the issue (N 1024..2^20, D 64/128/256, ...)
  ffkern bench --what e2e              only the end-to-end CFF step
Results go to <--out>/<device-slug>/<--tag>/.
"""
from __future__ import annotations

import argparse
import os

from .._cliargs import UsageError, as_usage_error, int_at_least, output_dir, path_component, real

# Only argparse here: torch loads when the command runs (ffkern/cli.py's rule).
_PROVIDERS = ("reference", "compile", "triton", "cpp")
_WHAT = ("supcon", "ff", "e2e")

# --quick: a minute or two on a 2-core CPU. One dtype and dynamic-shape compilation keep the
# torch.compile provider to one compilation per (kind, mode) instead of one per size.
QUICK = dict(ns=(512, 1024, 2048), ds=(128,), dtypes=("float32",), modes=("fwd", "fwdbwd"),
             ff_sizes=(2 ** 20, 2 ** 22), ff_losses=("ff",), repeats=3, warmup=1, rep_ms=50.0, max_call_s=2.0,
             quick_ceilings=True, compile_dynamic=True)
QUICK_E2E_CPU_BATCH = 64  # the full batch of 512 takes several seconds per step on a small CPU


_MAX_SIZE = 2 ** 62  # far above any size that fits a device; stops 2^100000000 from being computed at all
_POSITIVE, _COUNT = int_at_least(1), int_at_least(0)
_SECONDS = real(0.0, low_open=True)


def _size(text: str) -> int:
    """A size >= 2 (SweepConfig.check's rule): an integer, or a power written 2^k / 2**k."""
    t = text.strip().replace("**", "^")
    try:
        if "^" in t:
            base, exp = (int(part) for part in t.split("^"))
            value = base ** exp if 0 <= exp <= 62 and 0 <= base <= 2 ** 31 else None
        else:
            value = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a power like 2^16, got {text!r}") from None
    if value is None or not 2 <= value <= _MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be a size from 2 to 2^62, got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="benchmark the loss backends (and the CFF training step) against the reference",
        description="Measures the device's ceilings, then marginal SupCon and the FF losses for every provider "
                    "(reference, torch.compile of it, triton, cpp) over size ladders, then one end-to-end CFF step. "
                    "Writes a table, JSON, CSV and plots under OUT/<device>/<tag>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small ladder (N 512-2048, D 128, float32, FF 2^20-2^22 'ff' loss), 3 repeats, dynamic-shape "
                        "compile, e2e batch 64 on the CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="ffkern-bench-results", type=output_dir,
                   help="results root; files go to OUT/<device-slug>/<tag>/ (default: ./ffkern-bench-results, not"
                        " tracked by git; files git tracks are never overwritten unless --replace)")
    p.add_argument("--replace", action="store_true",
                   help="allow overwriting result files that git tracks (regenerating committed results)")
    p.add_argument("--tag", default=None, type=path_component,
                   help="results subfolder, a plain name (default: 'quick' or 'full')")
    p.add_argument("--what", nargs="+", choices=_WHAT, default=list(_WHAT), help="parts to run")
    p.add_argument("--providers", nargs="+", choices=_PROVIDERS, default=list(_PROVIDERS))
    p.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared machine')")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g = p.add_argument_group("sizes (defaults: the full sweep, or --quick's)")
    g.add_argument("--n", dest="ns", nargs="+", type=_size, default=None, help="SupCon rows N (e.g. 1024 2^16)")
    g.add_argument("--d", dest="ds", nargs="+", type=int_at_least(2), default=None, help="SupCon features D")
    g.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=None)
    g.add_argument("--modes", nargs="+", choices=("fwd", "fwdbwd"), default=None)
    g.add_argument("--ff-sizes", nargs="+", type=_size, default=None, help="FF elements B*D per tensor (e.g. 2^20 2^28)")
    g.add_argument("--ff-d", type=_POSITIVE, default=1024, help="FF features D (B = size / D)")
    g.add_argument("--ff-losses", nargs="+", choices=("ff", "symba", "sffa"), default=None)
    g = p.add_argument_group("timing and limits")
    g.add_argument("--repeats", type=_POSITIVE, default=None, help="CPU: timed calls per measurement (median)")
    g.add_argument("--warmup", type=_COUNT, default=None, help="CPU: untimed calls after the first (compiling) one")
    g.add_argument("--rep-ms", type=_SECONDS, default=None, help="GPU: do_bench timed duration per measurement")
    g.add_argument("--warmup-ms", type=real(0.0), default=25.0, help="GPU: do_bench warm-up duration")
    g.add_argument("--max-call-s", type=_SECONDS, default=None, help="skip a size whose predicted time per call is above this")
    g.add_argument("--max-mem-gb", type=_SECONDS, default=None, help="cap on the memory one measurement may use")
    g.add_argument("--max-total-s", type=_SECONDS, default=None, help="stop measuring (skip the rest, with the reason) after this")
    g.add_argument("--threads", type=_POSITIVE, default=None, help="CPU: torch threads in the workers (default: torch's)")
    g.add_argument("--tf32", action="store_true", help="fp32 products may use TF32 (torch.set_float32_matmul_precision('high'))")
    g.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the 'compile' provider")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--compile-dynamic", dest="compile_dynamic", action="store_const", const=True, default=None,
                   help="compile once for all sizes (dynamic shapes); --quick's default")
    c.add_argument("--compile-static", dest="compile_dynamic", action="store_const", const=False,
                   help="compile one specialized graph per size; the full sweep's default")
    g = p.add_argument_group("end-to-end CFF step (default: ViT[128 4 5], batch 512)")
    g.add_argument("--e2e-batch", type=_POSITIVE, default=None, help=f"default 512 ({QUICK_E2E_CPU_BATCH} with --quick on the CPU)")
    g.add_argument("--e2e-width", type=_POSITIVE, default=128)
    g.add_argument("--e2e-heads", type=_POSITIVE, default=4)
    g.add_argument("--e2e-depth", type=_POSITIVE, default=5)
    g.add_argument("--e2e-steps", type=_POSITIVE, default=None, help="timed steps (median); default 3 (2 with --quick)")
    g.add_argument("--e2e-warmup", type=_COUNT, default=1)
    g.add_argument("--e2e-bf16", action="store_true", help="ffkern trainer side: bf16 autocast of the layers")
    g.add_argument("--e2e-compile", action="store_true", help="ffkern trainer side: torch.compile every layer")
    g.add_argument("--e2e-cpu-heap", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: reuse freed memory in the benchmark's process (ffkern.cpu_heap; every loop gets it; default on)")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace):
    """The sweep's config; raises UsageError for what parsing could not check."""
    with as_usage_error():  # resolve_device and SweepConfig.check raise ValueError naming the option
        return _config(args).check()


def _config(args: argparse.Namespace):
    from .e2e import E2EConfig
    from .sweep import SweepConfig, resolve_device

    device = resolve_device(args.device)
    if "compile" in args.providers:
        _check_compile_backend(args.compile_backend)
    base = dict(QUICK) if args.quick else {}
    for name in ("ns", "ds", "dtypes", "modes", "ff_sizes", "ff_losses", "repeats", "warmup", "rep_ms", "max_call_s",
                 "compile_dynamic"):
        value = getattr(args, name)
        if value is not None:
            base[name] = tuple(value) if isinstance(value, list) else value
    batch = args.e2e_batch or (QUICK_E2E_CPU_BATCH if args.quick and device == "cpu" else 512)
    steps = args.e2e_steps or (2 if args.quick else 3)
    e2e = E2EConfig(batch=batch, width=args.e2e_width, heads=args.e2e_heads, depth=args.e2e_depth,
                    steps=steps, warmup=args.e2e_warmup, ffkern_bf16=args.e2e_bf16,
                    ffkern_compile=args.e2e_compile, cpu_heap=args.e2e_cpu_heap)
    return SweepConfig(device=device, tag=args.tag or ("quick" if args.quick else "full"), what=tuple(args.what),
                       providers=tuple(args.providers), ff_d=args.ff_d, warmup_ms=args.warmup_ms,
                       max_mem_gb=args.max_mem_gb, max_total_s=args.max_total_s,
                       fp32_precision="high" if args.tf32 else "highest", compile_backend=args.compile_backend,
                       threads=args.threads, e2e=e2e, note=args.note, **base)


def _check_compile_backend(name: str) -> None:
    """An unknown --compile-backend would fail every 'compile' measurement, one by one, late."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())  # the default hides debug ones like aot_eager
    if name not in known:
        shown = sorted(k for k in known if "TESTING_ONLY" not in k)
        raise UsageError(f"--compile-backend: unknown torch.compile backend {name!r}; torch knows {', '.join(shown)}")


def check_not_tracked(out_root: str, tag: str) -> None:
    """Before any measuring: a run's folder OUT/<device>/<tag>/ holding files that git tracks
    (committed results) is refused, so a quick try in a clone cannot overwrite them."""
    import glob
    import subprocess

    for folder in glob.glob(os.path.join(glob.escape(out_root), "*", glob.escape(tag))):
        try:
            listed = subprocess.run(["git", "ls-files", "--", "."], cwd=folder, capture_output=True, text=True,
                                    timeout=30)
        except (OSError, subprocess.SubprocessError):  # no git: nothing can be tracked
            continue
        tracked = listed.stdout.split() if listed.returncode == 0 else []
        if tracked:
            raise UsageError(f"--out {out_root} --tag {tag}: {folder} holds {len(tracked)} files that git tracks"
                             f" (committed results); choose another --out or --tag, or pass --replace to regenerate them")


def run(args: argparse.Namespace) -> int:
    from .report import add_derived, disagreements, format_table, write_all
    from .sweep import run_sweep

    cfg = config_from_args(args)
    if not args.replace:
        check_not_tracked(args.out, cfg.tag)
    results = add_derived(run_sweep(cfg))
    paths = write_all(results, args.out, plots=not args.no_plots)
    print()
    print(format_table(results))
    print()
    print(f"results written to {paths[0].rsplit('/', 1)[0]}/ ({len(paths)} files)")
    bad = disagreements(results)
    failed = [r for kind in ("supcon", "ff") for r in results[kind] if r.get("status") == "failed"]
    if isinstance(results.get("e2e"), dict) and results["e2e"].get("status") == "failed":
        failed.append(results["e2e"])
    for r in bad:
        print(f"DISAGREEMENT: {r['provider']} {r['kind']} {r['mode']} {r['dtype']} differs from the reference "
              f"by {r['loss_rel_diff']:.2e} (relative)")
    for r in failed:
        print(f"FAILED: {r.get('provider', 'e2e')}: {r.get('reason')}")
    return 1 if bad or failed else 0
