"""Goals of the cpp CPU backend (issues 3 and 14), measured so that every ratio comes from one run.

  python benchmarks/cpp_cpu_goals.py N BACKEND
      issue 3: fwd+bwd time and peak RSS of one marginal SupCon call, D=128, fp32, margin 0.4
      (one process per run, so peak RSS is that call's)
  python benchmarks/cpp_cpu_goals.py supcon [--n 8192] [--repeats 3] [--json FILE]
      issue 14: SupCon cpp fwd+bwd, D=128, in fp32, bf16 and fp16 (the automatic choice of
      products and both forced: FFKERN_CPU_HALF_PRODUCTS=half|float), the fp32 kernel with its
      element loops stubbed (its GEMMs alone), and the fp32 / bf16 matrix-product rates of
      torch.mm at the kernel's tile shape, all interleaved in each repeat
  python benchmarks/cpp_cpu_goals.py ff [--log2-sizes 20 22 24] [--repeats 5] [--json FILE]
      issue 14: FF losses (goodness, ff, symba, sffa; [B, D] and [B, T, D]) fwd+bwd, cpp against
      torch.compile and eager of the reference, and a torch copy of the same bytes; --cases
      sffa_activity measures SFFA with its activity term (issue 12)

Load: this machine is shared, so every figure records the load average before and after it and,
where ffkern.bench.machine_load is present, the cores other processes kept busy meanwhile; a
figure taken under load is marked. Variants are interleaved within each repeat and the minimum
over repeats is reported (the least disturbed sample), the median next to it.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager

import torch

import ffkern

try:
    from ffkern.bench.machine_load import LoadProbe
except ImportError:  # older tree: load averages only
    LoadProbe = None


@contextmanager
def load_probe(record):
    """Fills record["load"] with the load before/after the block (and others' cores if known)."""
    if LoadProbe is not None:
        with LoadProbe() as probe:
            yield
        record["load"] = probe.result
        return
    before = os.getloadavg()
    yield
    record["load"] = {"load_average_before": [round(v, 2) for v in before],
                      "load_average_after": [round(v, 2) for v in os.getloadavg()],
                      "other_processes_cores": None, "under_load": None}


def load_note(record):
    load = record.get("load") or {}
    la = f"load {load.get('load_average_before', ['?'])[0]}->{load.get('load_average_after', ['?'])[0]}"
    if load.get("other_processes_cores") is not None:
        la += f", others {load['other_processes_cores']:.2f} cores"
    return la + (" [UNDER LOAD]" if load.get("under_load") else "")


@contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_model():
    """The CPU's model name (the development and CI machines differ: Xeon with AVX-512, EPYC with AVX2)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def machine():
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    isa = [k for k in ("avx512_f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
           if caps.get(k)]
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "isa": isa, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


# ---- issue 3 -------------------------------------------------------------------------------------

def issue3(n, backend):
    torch.manual_seed(0)
    x = torch.randn(n // 2, 2, 128, requires_grad=True); y = torch.randint(0, 100, (n // 2,))
    ffkern.marginal_supcon_loss(x[:8], y[:8], margin=0.4, backend=backend).backward()  # load / warm up
    x.grad = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    loss = ffkern.marginal_supcon_loss(x, y, margin=0.4, backend=backend); loss.backward()
    dt = time.perf_counter() - t
    print(f"N={n} {backend}: loss {loss.item():.6f} fwd+bwd {dt:.2f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB (before: {base/1024:.0f} MB)")


# ---- issue 14: SupCon ----------------------------------------------------------------------------

D = 128
COL_TILE = 1024  # csrc/cpu/supcon_loops.h kColBlock


def supcon_flops(n):
    """Matrix-product work of one fwd+bwd: s in the forward, s again and dz += G z in the backward."""
    return 3 * 2 * n * n * D


def supcon_variants(n):
    torch.manual_seed(0)
    x = torch.randn(n // 2, 2, D); y = torch.randint(0, 100, (n // 2,))

    def run(dtype, **flags):
        xx = x.to(dtype).requires_grad_()

        def call():
            with env(**flags):
                ffkern.marginal_supcon_loss(xx, y, margin=0.4, backend="cpp").backward()
        return call

    # GEMM rate at the kernel's shape (rows x D times D x 1024 columns), all threads, like the kernel
    a32, b32 = torch.randn(n, D), torch.randn(D, COL_TILE)
    out = torch.empty(n, COL_TILE)

    def mm(dtype):
        a, b = a32.to(dtype), b32.to(dtype)
        o = out if dtype == torch.float32 else out.to(dtype)

        def call():
            for _ in range(n // COL_TILE):  # n x n products, one column tile at a time
                torch.mm(a, b, out=o)
        return call

    return {
        "fp32": run(torch.float32, FFKERN_CPU_SUPCON_STUB=None),
        "fp32 GEMMs only (element loops stubbed)": run(torch.float32, FFKERN_CPU_SUPCON_STUB="loops"),
        "bf16 auto": run(torch.bfloat16, FFKERN_CPU_HALF_PRODUCTS=None),
        "bf16 16-bit products": run(torch.bfloat16, FFKERN_CPU_HALF_PRODUCTS="half"),
        "bf16 fp32 products": run(torch.bfloat16, FFKERN_CPU_HALF_PRODUCTS="float"),
        "fp16 auto": run(torch.float16, FFKERN_CPU_HALF_PRODUCTS=None),
        "fp16 16-bit products": run(torch.float16, FFKERN_CPU_HALF_PRODUCTS="half"),
        "torch.mm fp32 (n x n x D, tile shape)": mm(torch.float32),
        "torch.mm bf16 (n x n x D, tile shape)": mm(torch.bfloat16),
    }


def supcon(args):
    n = args.n
    variants = supcon_variants(n)
    if args.only:
        # "=name" selects that variant exactly, anything else by substring
        variants = {k: v for k, v in variants.items()
                    if any(k == o[1:] if o.startswith("=") else o in k for o in args.only)}
    for call in variants.values():  # build / load, warm up
        call()
    samples = {k: [] for k in variants}
    record = {"machine": machine(), "n": n, "d": D, "repeats": args.repeats, "figures": {}}
    with load_probe(record):
        for r in range(args.repeats):
            for name, call in variants.items():
                fig = {}
                with load_probe(fig):
                    dt = timed(call)
                samples[name].append({"s": dt, "load": fig["load"]})
    for name, ss in samples.items():
        flops = supcon_flops(n) // (3 if name.startswith("torch.mm") else 1)
        times = [s["s"] for s in ss]
        best = min(range(len(times)), key=times.__getitem__)
        record["figures"][name] = {"min_s": times[best], "median_s": statistics.median(times), "samples_s": times,
                                   "gflops_at_min": flops / times[best] / 1e9, "load_of_min": ss[best]["load"],
                                   "under_load_any": any(s["load"].get("under_load") for s in ss)}
    figs = record["figures"]

    def ratio(a, b):
        return figs[a]["min_s"] / figs[b]["min_s"] if a in figs and b in figs else None

    record["ratios"] = {
        "bf16 auto speed-up over fp32": ratio("fp32", "bf16 auto"),
        "bf16 16-bit products speed-up over fp32": ratio("fp32", "bf16 16-bit products"),
        "fp32 kernel rate / fp32 matrix-product rate": ratio("torch.mm fp32 (n x n x D, tile shape)", "fp32") and
        figs["fp32"]["gflops_at_min"] / figs["torch.mm fp32 (n x n x D, tile shape)"]["gflops_at_min"],
        "fp32 GEMMs-only share of the fp32 kernel": ratio("fp32 GEMMs only (element loops stubbed)", "fp32"),
    }
    print(f"SupCon cpp fwd+bwd, N={n}, D={D}, {record['machine']['threads']} threads, torch {torch.__version__}, "
          f"ISA {record['machine']['isa']}; min of {args.repeats} interleaved repeats ({load_note(record)})")
    for name, f in figs.items():
        rate = f["gflops_at_min"]
        print(f"  {name:42s} {f['min_s']:7.3f} s (median {f['median_s']:.3f})  {rate:6.1f} GFLOP/s  "
              f"[{load_note(f['load_of_min'] and {'load': f['load_of_min']})}]")
    for k, v in record["ratios"].items():
        if v is not None:
            print(f"  {k}: {v:.2f}")
    dump(args, record)


# ---- issue 14: FF losses -------------------------------------------------------------------------

FF_CASES = ("goodness", "ff", "symba", "sffa")
EXTRA_FF_CASES = ("sffa_activity",)  # SFFA with its activity term (--cases sffa_activity), not run by default
TOKENS = 8  # [B, T, D] layout: T tokens of D features, skip_tokens=1 (a label token)
FEATURES = 512


def ff_calls(case, layout, numel, provider):
    """A fwd+bwd callable of one FF loss on tensors of `numel` fp32 elements, and its bytes moved."""
    from ffkern import reference
    from ffkern.bench.providers import FF_PARAMS

    shape = (numel // FEATURES, FEATURES) if layout == "BD" else (numel // (TOKENS * FEATURES), TOKENS, FEATURES)
    skip = 1 if layout == "BTD" else 0
    gen = torch.Generator().manual_seed(0)
    hp = torch.randn(shape, generator=gen).requires_grad_()
    hn = torch.randn(shape, generator=gen).requires_grad_() if case != "goodness" else None

    def loss_fn(backend):
        if case == "goodness":
            if backend is None:
                return lambda a: reference.goodness(a, "mean", skip).sum()
            return lambda a: ffkern.ff_goodness(a, skip_tokens=skip, backend=backend).sum()
        if backend is None:
            fn = {"ff": reference.ff_loss, "symba": reference.symba_loss}.get(case)
            if case == "sffa":
                return lambda a, b: reference.sffa_loss(a, b, "mean", skip)
            if case == "sffa_activity":
                return lambda a, b: reference.sffa_loss(a, b, "mean", skip, activity_term=True)
            return lambda a, b: fn(a, b, FF_PARAMS[case], "mean", skip)
        if case == "ff":
            return lambda a, b: ffkern.ff_loss(a, b, threshold=FF_PARAMS["ff"], skip_tokens=skip, backend=backend)
        if case == "symba":
            return lambda a, b: ffkern.symba_loss(a, b, alpha=FF_PARAMS["symba"], skip_tokens=skip, backend=backend)
        return lambda a, b: ffkern.sffa_loss(a, b, skip_tokens=skip, activity_term=case == "sffa_activity",
                                             backend=backend)

    inputs = (hp,) if hn is None else (hp, hn)
    if provider == "copy":
        def call():
            for t in inputs:  # read + write each input once, into a fresh tensor as the kernels' outputs are
                t.detach().clone()
        return call, 2 * 4 * numel * len(inputs)
    if provider == "copy_":
        outs = [torch.empty_like(t) for t in inputs]

        def call():
            for o, t in zip(outs, inputs):  # the same into preallocated tensors: no page faults
                o.copy_(t.detach())
        return call, 2 * 4 * numel * len(inputs)
    fn = loss_fn("cpp" if provider == "cpp" else None)
    if provider == "compile":
        fn = torch.compile(fn, fullgraph=True, dynamic=False)

    def call():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward()
    return call, fused_kernel_bytes(layout, numel) * len(inputs)


def fused_kernel_bytes(layout, numel):
    """Bytes the cpp kernels move per fp32 input of numel elements, fwd+bwd. [B, D]: the forward reads
    h, the backward reads it again and writes dh (3 x 4 numel). [B, T, D]: the forward reads h and
    writes the token means [B, D] (numel / T values), the backward reads the means and writes dh:
    8 (1 + 1/T) numel."""
    if layout == "BD":
        return 3 * 4 * numel
    return 2 * 4 * numel + 2 * 4 * (numel // TOKENS)


def ff(args):
    import torch._dynamo.config as dynamo_config

    dynamo_config.cache_size_limit = max(getattr(dynamo_config, "cache_size_limit", 8), 256)
    if hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    record = {"machine": machine(), "repeats": args.repeats, "tokens": TOKENS, "features": FEATURES, "figures": [],
              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
              "bytes": "cpp/compile/eager: the cpp kernels' traffic per input: BD 3 x 4 x numel (forward read, "
                       "backward read + write), BTD 8 x (1 + 1/T) x numel (forward read h + write the token means, "
                       "backward read the means + write dh); "
                       "copy: 2 x 4 x numel per input (clone: fresh output; copy_: preallocated)"}
    print(f"FF losses fwd+bwd, fp32, {record['machine']['threads']} threads, torch {torch.__version__}; "
          f"min of {args.repeats} interleaved repeats; GB/s = bytes the fused kernels must move / time")
    with load_probe(record):
        for log2 in args.log2_sizes:
            numel = 1 << log2
            for layout in args.layouts:
                for case in args.cases:
                    calls = {p: ff_calls(case, layout, numel, p) for p in ("copy", "copy_", "cpp", "compile", "eager")}
                    for call, _ in calls.values():
                        call(); call()  # compile / warm up
                    times = {p: [] for p in calls}
                    fig = {"case": case, "layout": layout, "numel": numel}
                    with load_probe(fig):
                        for _ in range(args.repeats):
                            for p, (call, _) in calls.items():
                                times[p].append(timed(call))
                    fig["min_s"] = {p: min(t) for p, t in times.items()}
                    fig["median_s"] = {p: statistics.median(t) for p, t in times.items()}
                    copy_bw = calls["copy"][1] / fig["min_s"]["copy"]
                    kernel_bytes = calls["cpp"][1]
                    fig["copy_GBps"] = copy_bw / 1e9
                    fig["copy_prealloc_GBps"] = calls["copy_"][1] / fig["min_s"]["copy_"] / 1e9
                    fig["cpp_fraction_of_copy_prealloc"] = kernel_bytes / fig["min_s"]["cpp"] / 1e9 / fig["copy_prealloc_GBps"]
                    fig["GBps"] = {p: kernel_bytes / fig["min_s"][p] / 1e9 for p in ("cpp", "compile", "eager")}
                    fig["cpp_fraction_of_copy"] = fig["GBps"]["cpp"] / fig["copy_GBps"]
                    fig["cpp_speedup_over_compile"] = fig["min_s"]["compile"] / fig["min_s"]["cpp"]
                    record["figures"].append(fig)
                    print(f"  2^{log2} {layout:3s} {case:8s} copy {fig['copy_GBps']:5.1f} (prealloc {fig['copy_prealloc_GBps']:5.1f}) GB/s"
                          f" | cpp {fig['GBps']['cpp']:5.1f} ({100 * fig['cpp_fraction_of_copy']:3.0f}% of copy, "
                          f"{100 * fig['cpp_fraction_of_copy_prealloc']:3.0f}% of prealloc) compile {fig['GBps']['compile']:5.1f} "
                          f"eager {fig['GBps']['eager']:5.1f} GB/s | cpp {fig['cpp_speedup_over_compile']:.2f}x compile "
                          f"[{load_note(fig)}]", flush=True)
                    torch._dynamo.reset()
    dump(args, record)


def dump(args, record):
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"written {args.json}")


def main(argv):
    if argv and argv[0].isdigit():
        return issue3(int(argv[0]), argv[1])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("supcon")
    s.add_argument("--n", type=int, default=8192)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--only", nargs="*", help="substrings of the variant names to run ('=name': exactly that one)")
    s.add_argument("--json")
    f = sub.add_parser("ff")
    f.add_argument("--log2-sizes", type=int, nargs="+", default=[20, 22, 24])
    f.add_argument("--layouts", nargs="+", default=["BD", "BTD"], choices=["BD", "BTD"])
    f.add_argument("--cases", nargs="+", default=list(FF_CASES), choices=list(FF_CASES + EXTRA_FF_CASES))
    f.add_argument("--repeats", type=int, default=5)
    f.add_argument("--json")
    args = p.parse_args(argv)
    (supcon if args.what == "supcon" else ff)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
