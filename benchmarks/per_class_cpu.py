"""The per-class goodness loss (SPEC 2.2) on the CPU: backend "cpp" against the reference (issue 12).

  python benchmarks/per_class_cpu.py [--shapes 128x64x8 512x128x16 ...] [--dtypes fp32 bf16]
      [--layouts nchw channels_last] [--passes fwd+bwd fwd] [--no-compile] [--repeats 7]
      [--warmups 3] [--reuse-freed-memory] [--json FILE]

Per figure (shape B x C x H=W, K = 10 classes, dtype, layout, pass) the providers run interleaved
within each repeat, after the warm-ups:
  cpp        ffkern.per_class_goodness_loss(h, w, y, backend="cpp"): the fused kernel as shipped
  cpp-loops  the same with FFKERN_CPU_PER_CLASS_PRODUCTS=loops: the fused kernel's plain loops
             (the kernel before the blocked products; float32 accumulation only)
  reference  backend="reference" (PyTorch: einsum, square, mean, logsumexp; autograd)
  compile    torch.compile(fullgraph=True, dynamic=False) of the reference (unless --no-compile, or
             where compiling fails: then the failure is recorded)
"fwd+bwd" is loss.backward() with h and W requiring grad; "fwd" the loss alone under no_grad.
Large gradients are fresh memory on every call by default (glibc maps them anew: the page faults
of a 67 MB dh cost ~16 ms on the development VM, for every provider alike);
--reuse-freed-memory applies ffkern.cpu_heap.reuse_freed_cpu_memory() first (as `ffkern train`
does on the CPU), so that the figures are the kernels' own.
Reported: the median and the minimum over the repeats, and the speed-up of cpp over each other
provider by the medians. The machine may be shared: every figure records the load before and
after it and the cores other processes kept busy meanwhile (cpp_cpu_goals.load_probe, i.e.
ffkern.bench.machine_load), and is marked "under load" when others used more than the threshold.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpp_cpu_goals import dump, env, load_note, load_probe, machine, timed  # noqa: E402

import ffkern  # noqa: E402
from ffkern import cpu_heap  # noqa: E402
from ffkern import reference  # noqa: E402

CLASSES = 10
SHAPES = ("128x64x8", "512x128x16", "256x256x8", "256x512x8", "64x256x16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("cpp", "cpp-loops", "reference", "compile")


def parse_shape(text):
    b, c, s = (int(v) for v in text.lower().split("x"))
    return b, c, s


def make_inputs(b, c, s, dtype, layout):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(b, c, s, s, generator=gen).to(dtype)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(CLASSES, c, generator=gen) / c ** 0.5).to(dtype)
    y = torch.randint(0, CLASSES, (b,), generator=gen)
    return h, w, y


def provider_calls(h, w, y, pass_, use_compile):
    """name -> a callable of one measured call; a provider that cannot run maps to its error text."""
    grad = pass_ == "fwd+bwd"
    hg, wg = h.clone().requires_grad_(grad), w.clone().requires_grad_(grad)

    def wrap(loss_fn, flags=None):
        def call():
            with env(**(flags or {})):
                if grad:
                    hg.grad = wg.grad = None
                    loss_fn(hg, wg, y).backward()
                else:
                    with torch.no_grad():
                        loss_fn(hg, wg, y)
        return call

    calls = {
        "cpp": wrap(lambda a, b, t: ffkern.per_class_goodness_loss(a, b, t, backend="cpp"),
                    {"FFKERN_CPU_PER_CLASS_PRODUCTS": None}),
        "cpp-loops": wrap(lambda a, b, t: ffkern.per_class_goodness_loss(a, b, t, backend="cpp"),
                          {"FFKERN_CPU_PER_CLASS_PRODUCTS": "loops"}),
        "reference": wrap(lambda a, b, t: reference.per_class_loss(a, b, t)),
    }
    if use_compile:
        compiled = torch.compile(lambda a, b, t: reference.per_class_loss(a, b, t), fullgraph=True, dynamic=False)
        call = wrap(compiled)
        try:
            call(); call()  # compile (and the backward graph) outside the measurement
            calls["compile"] = call
        except Exception as exc:  # recorded, not hidden: the figure says why compile is missing
            calls["compile"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return calls


def figure(args, shape, dtype_name, layout, pass_):
    b, c, s = parse_shape(shape)
    h, w, y = make_inputs(b, c, s, DTYPES[dtype_name], layout)
    calls = provider_calls(h, w, y, pass_, args.compile)
    runnable = {k: v for k, v in calls.items() if callable(v)}
    for call in runnable.values():
        for _ in range(args.warmups):
            call()
    times = {k: [] for k in runnable}
    fig = {"shape": {"B": b, "C": c, "H": s, "W": s, "K": CLASSES}, "dtype": dtype_name, "layout": layout,
           "pass": pass_, "errors": {k: v for k, v in calls.items() if not callable(v)}}
    with load_probe(fig):
        for _ in range(args.repeats):
            for name, call in runnable.items():
                times[name].append(timed(call))
    fig["median_ms"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    fig["min_ms"] = {k: 1e3 * min(v) for k, v in times.items()}
    fig["samples_ms"] = {k: [1e3 * t for t in v] for k, v in times.items()}
    fig["cpp_speedup_by_median"] = {k: fig["median_ms"][k] / fig["median_ms"]["cpp"] for k in times if k != "cpp"}
    fig["under_load"] = bool(fig["load"].get("under_load"))
    return fig


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="B x C x H (H = W), e.g. 256x256x8")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    p.add_argument("--passes", nargs="+", default=["fwd+bwd", "fwd"], choices=["fwd+bwd", "fwd"])
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile of the reference")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmups", type=int, default=3)
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="serve large tensors from the heap (ffkern.cpu_heap): no page faults per call")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.reuse_freed_memory and not cpu_heap.reuse_freed_cpu_memory():
        raise SystemExit(f"--reuse-freed-memory: not available here ({cpu_heap.unavailable_reason()})")
    for shape in args.shapes:
        parse_shape(shape)  # a bad shape fails before any work
    if args.compile:
        import torch._dynamo.config as dynamo_config

        dynamo_config.cache_size_limit = max(getattr(dynamo_config, "cache_size_limit", 8), 256)
        if hasattr(dynamo_config, "recompile_limit"):
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    record = {"machine": machine(), "classes": CLASSES, "repeats": args.repeats, "warmups": args.warmups,
              "statistic": "median over repeats (min next to it); providers interleaved per repeat",
              "reuse_freed_memory": args.reuse_freed_memory,
              "command": "python benchmarks/per_class_cpu.py " + " ".join(argv), "figures": []}
    print(f"per-class loss, K={CLASSES}, {record['machine']['threads']} threads, torch {torch.__version__}, "
          f"ISA {record['machine']['isa']}; median of {args.repeats} after {args.warmups} warm-ups (ms)"
          f"{'; freed memory reused (no page faults)' if args.reuse_freed_memory else ''}")
    with load_probe(record):
        for shape in args.shapes:
            for dtype_name in args.dtypes:
                for layout in args.layouts:
                    for pass_ in args.passes:
                        fig = figure(args, shape, dtype_name, layout, pass_)
                        record["figures"].append(fig)
                        med = fig["median_ms"]
                        others = " ".join(f"{k} {med[k]:7.2f} ({fig['cpp_speedup_by_median'][k]:.2f}x)"
                                          for k in PROVIDERS if k in med and k != "cpp")
                        missing = "".join(f" [{k}: {e}]" for k, e in fig["errors"].items())
                        print(f"  {shape:11s} {dtype_name} {layout:13s} {pass_:7s} cpp {med['cpp']:7.2f} | {others}"
                              f"  [{load_note(fig)}]{missing}", flush=True)
    record["under_load_figures"] = sum(f["under_load"] for f in record["figures"])
    print(f"{record['under_load_figures']} of {len(record['figures'])} figures under load ({load_note(record)})")
    dump(args, record)


if __name__ == "__main__":
    main(sys.argv[1:])
