"""Static report of the GPU kernels for sm_90a, without a GPU: what the compilers emit.

Triton: every configuration the launchers use (recorded from the real launchers, with the exact
launch specialization: kernels/_aot.py), compiled with the GPU machines' Triton (3.6.0, in its own
environment: gpu_toolchain.py). C++/CUDA: csrc/cuda/*.cu with nvcc -Xptxas -v and cuobjdump -sass.
Per kernel: registers, spill bytes, shared memory, CTAs per SM, and for the hot loop (the interior
column sweep) the SASS instructions issued per (row, column) pair, split by pipe.

    python benchmarks/sass_report.py [--out benchmarks/results/static-sm90] [--sass-dir DIR]

Per-pair figures are per-thread instructions of one loop trip times the threads of a CTA, over the
pairs of one tile: the issue slots a pair costs. benchmarks/NOTES.md says what each number bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_toolchain  # noqa: E402

CAPABILITY = 90
SUPCON_TARGETS = dict(per_pair=60.0, alu_per_pair=30.0, min_ctas=2)  # bf16/fp16, D=128, fwd + bwd


def _in_pinned_env() -> bool:
    import triton

    return triton.__version__ == gpu_toolchain.GPU_TRITON


def triton_rows(sass_dir: Path | None):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from ffkern.kernels import _aot

    rows = []
    for what, launch in _aot.all_launch_cases():
        compiled = _aot.compile_launch(launch, CAPABILITY)
        res = _aot.ptxas_resources(compiled, CAPABILITY)
        text = _aot.sass_text(compiled, CAPABILITY)
        meta = launch.meta
        pairs = meta.get("BLOCK_M", 0) * meta.get("BLOCK_N", 0)
        hot = _aot.hot_loop(text, res.threads, pairs) if pairs else None
        rows.append(dict(kernel=what, registers=res.registers, spill_stores=res.spill_stores,
                         spill_loads=res.spill_loads, shared=res.shared, threads=res.threads,
                         ctas_per_sm=res.ctas_per_sm,
                         tile={k: v for k, v in meta.items() if k.startswith("BLOCK") or k == "num_warps"},
                         hot_loop=None if hot is None else dict(instructions=hot.instructions, nested=hot.nested,
                                                                per_pair=round(hot.per_pair, 2),
                                                                by_pipe={k: round(v, 2) for k, v in
                                                                         hot.per_pair_by_pipe.items()})))
        if sass_dir is not None:
            sass_dir.mkdir(parents=True, exist_ok=True)
            (sass_dir / (re.sub(r"[^A-Za-z0-9=.]+", "_", what) + ".sass")).write_text(text)
    return rows


# Tile loop of the C++/CUDA SupCon kernels: (threads, pairs per trip) by kernel and input type.
# The mma kernels' interior tile loop has no inner loop when whole rows are resident (D <= 128).
CUDA_TILES = {"supcon_forward_mma": (128, 64 * 64), "supcon_backward_mma": (128, 64 * 64),
              "supcon_forward_simt": (128, 64 * 64)}
CUDA_TILES_FP64 = {"supcon_forward_simt": (128, 32 * 32)}


def _demangle(names):
    """Readable kernel names (template arguments kept, namespaces and parameter lists dropped)."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        pretty = out.strip().splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    result = {}
    for raw, nice in zip(names, pretty):
        nice = re.sub(r"^void ", "", nice).replace("ffkern::cuda::(anonymous namespace)::", "")
        depth, cut = 0, len(nice)
        for i, ch in enumerate(nice):  # drop the parameter list: the first '(' outside <...>
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                cut = i
                break
        result[raw] = nice[:cut]
    return result


def _ctas_per_sm(registers: int, shared: int, threads: int) -> int:
    from ffkern.kernels import _aot

    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps = threads // 32
    by_regs = (_aot.REGISTERS_PER_SM // per_warp) // warps
    by_threads = _aot.MAX_THREADS_PER_SM[CAPABILITY] // threads
    by_shared = _aot.SHARED_PER_SM[CAPABILITY] // (shared + 1024) if shared else 32
    return min(by_regs, by_threads, by_shared, 32)


def _cuda_hot_loop(instructions, labels, base: str, fp64: bool):
    """The interior tile loop (the smallest loop with MUFU.EX2) of the SupCon kernels, per pair;
    for the other kernels the largest innermost loop, per trip."""
    from ffkern.kernels import _aot

    loops = _aot.loops(instructions, labels)
    if not loops:
        return None
    tiles = (CUDA_TILES_FP64 if fp64 else {}).get(base) or CUDA_TILES.get(base)
    if tiles:
        with_exp = [lp for lp in loops if any(op.startswith("MUFU.EX2") for _, op, _ in instructions[lp[0]:lp[1] + 1])]
        if with_exp:
            first, last = min(with_exp, key=lambda lp: lp[1] - lp[0])
            nested = any(o != (first, last) and first <= o[0] and o[1] <= last for o in loops)
            body = instructions[first:last + 1]
            mix = {}
            for _, op, _ in body:
                mix[_aot.pipe_of(op)] = mix.get(_aot.pipe_of(op), 0) + 1
            threads, pairs = tiles
            scale = threads / pairs
            return "hot_loop", dict(instructions=len(body), nested=nested, per_pair=round(len(body) * scale, 2),
                                    by_pipe={k: round(v * scale, 2) for k, v in sorted(mix.items())})
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    first, last = max(inner, key=lambda lp: lp[1] - lp[0])
    mix = {}
    for _, op, _ in instructions[first:last + 1]:
        mix[_aot.pipe_of(op)] = mix.get(_aot.pipe_of(op), 0) + 1
    return "innermost_loop", dict(instructions=last - first + 1, by_pipe=dict(sorted(mix.items())))


def cuda_rows(sass_dir: Path | None, source_dir: Path | None = None):
    """nvcc 13.0 for sm_90a: ptxas -v per kernel, CTAs per SM, and the SASS pipe mix of each
    kernel's hot loop (the SupCon kernels: per pair of the interior tile loop)."""
    from ffkern.kernels import _aot

    nvcc = os.environ.get("NVCC", "nvcc")
    rows = []
    for source in sorted((source_dir or ROOT / "csrc" / "cuda").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cmd = [nvcc, "-cubin", "-std=c++17", "-O3", "-arch=sm_90a", "-Xptxas", "-v",
                   "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                   "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", str(source), "-o", str(cubin)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                rows.append(dict(kernel=source.name, error=(out.stderr or out.stdout)[-2000:]))
                continue
            log = out.stderr + out.stdout
            sass = subprocess.run([_aot.cuobjdump_path(CAPABILITY), "-sass", str(cubin)], capture_output=True,
                                  text=True).stdout
        usage = {}
        current = None
        for line in log.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                current = m.group(1)
                usage[current] = {}
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and current:
                usage[current].update(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)))
            m = re.search(r"Used (\d+) registers", line)
            if m and current:
                usage[current]["registers"] = int(m.group(1))
                smem = re.search(r"(\d+) bytes smem", line)
                usage[current]["shared"] = int(smem.group(1)) if smem else 0
        chunks = re.split(r"\n\s+Function : ", sass)[1:]
        names = [chunk.split("\n", 1)[0].strip() for chunk in chunks]
        pretty = _demangle(names)
        found = []
        for name, chunk in zip(names, chunks):
            instructions, labels = _aot.parse_sass(chunk)
            nice = pretty.get(name, name)
            base = nice.split("<", 1)[0]
            row = dict(kernel=f"{source.name}:{nice}", **usage.get(name, {}))
            threads = 512 if base == "bwd_params_kernel" else (128 if base.startswith("supcon") else 256)
            if "registers" in row:
                row["threads"] = threads
                row["ctas_per_sm"] = _ctas_per_sm(row["registers"], row.get("shared", 0), threads)
            hot = _cuda_hot_loop(instructions, labels, base, "<double" in nice)
            if hot is not None:
                row[hot[0]] = hot[1]
            found.append(row)
            if sass_dir is not None:
                sass_dir.mkdir(parents=True, exist_ok=True)
                (sass_dir / ("cuda_" + re.sub(r"[^A-Za-z0-9=.]+", "_", nice)[:80] + ".sass")).write_text(chunk)
        rows.extend(sorted(found, key=lambda r: r["kernel"]))
    return rows


def supcon_verdict(rows):
    """The issue's static targets for SupCon bf16/fp16 D=128 (fused normalization), forward +
    backward hot loops together."""
    lines = []
    for dtype in ("bfloat16", "float16"):
        fwd = next(r for r in rows if r["kernel"] == f"supcon _supcon_fwd_kernel {dtype} D=128 scaled")
        bwd = next(r for r in rows if r["kernel"] == f"supcon _supcon_bwd_kernel {dtype} D=128 scaled")
        per_pair = fwd["hot_loop"]["per_pair"] + bwd["hot_loop"]["per_pair"]
        alu = fwd["hot_loop"]["by_pipe"].get("alu", 0) + bwd["hot_loop"]["by_pipe"].get("alu", 0)
        spills = fwd["spill_stores"] + bwd["spill_stores"] + fwd["spill_loads"] + bwd["spill_loads"]
        ctas = min(fwd["ctas_per_sm"], bwd["ctas_per_sm"])
        ok = (per_pair <= SUPCON_TARGETS["per_pair"] and alu <= SUPCON_TARGETS["alu_per_pair"] and not spills
              and ctas >= SUPCON_TARGETS["min_ctas"])
        lines.append(f"SupCon {dtype} D=128 fwd+bwd: {per_pair:.1f} issued/pair (target <= 60), {alu:.1f} on the "
                     f"alu pipe (<= 30), spills {spills} B (0), CTAs/SM {ctas} (>= 2): {'MET' if ok else 'NOT MET'}")
    return lines


def cuda_supcon_verdict(rows):
    """The same targets for the C++/CUDA mma kernels (whole rows resident for D = 128)."""
    lines = []
    for dtype in ("__nv_bfloat16", "__half"):
        try:
            fwd = next(r for r in rows if r["kernel"] == f"supcon_kernels.cu:supcon_forward_mma<{dtype}, 128>")
            bwd = next(r for r in rows if r["kernel"] == f"supcon_kernels.cu:supcon_backward_mma<{dtype}, 128>")
        except StopIteration:
            continue
        per_pair = fwd["hot_loop"]["per_pair"] + bwd["hot_loop"]["per_pair"]
        alu = fwd["hot_loop"]["by_pipe"].get("alu", 0) + bwd["hot_loop"]["by_pipe"].get("alu", 0)
        spills = sum(r.get(k, 0) for r in (fwd, bwd) for k in ("spill_stores", "spill_loads"))
        ctas = min(fwd["ctas_per_sm"], bwd["ctas_per_sm"])
        ok = (per_pair <= SUPCON_TARGETS["per_pair"] and alu <= SUPCON_TARGETS["alu_per_pair"] and not spills
              and ctas >= SUPCON_TARGETS["min_ctas"])
        lines.append(f"cpp CUDA SupCon {dtype.strip('_')} D=128 fwd+bwd: {per_pair:.1f} issued/pair (target <= 60), "
                     f"{alu:.1f} on the alu pipe (<= 30), spills {spills} B (0), CTAs/SM {ctas} (>= 2): "
                     f"{'MET' if ok else 'NOT MET'}")
    return lines


def format_table(rows):
    out = [f"{'kernel':58s} {'regs':>4s} {'spill':>9s} {'smem':>7s} {'cta':>3s} {'/pair':>6s}  pipes per pair"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['kernel']:58s} FAILED: {r['error'][:200]}")
            continue
        hot = r.get("hot_loop")
        spill = f"{r.get('spill_stores', 0)}/{r.get('spill_loads', 0)}"
        if hot:
            pipes = " ".join(f"{k}={v}" for k, v in hot["by_pipe"].items())
            pp = f"{hot['per_pair']:6.1f}" + ("*" if hot["nested"] else " ")
        elif r.get("innermost_loop"):
            loop = r["innermost_loop"]
            pipes = f"innermost loop {loop['instructions']} instr: " + " ".join(f"{k}={v}" for k, v in loop["by_pipe"].items())
            pp = "     -"
        else:
            pipes, pp = "", "     -"
        out.append(f"{r['kernel']:58s} {r.get('registers', 0):4d} {spill:>9s} {r.get('shared', 0):7d} "
                   f"{r.get('ctas_per_sm', '-')!s:>3s} {pp} {pipes}")
    out.append("* nested loop (feature chunks): the figure counts one trip of the inner loop")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for report.txt and report.json")
    parser.add_argument("--sass-dir", type=Path, default=None, help="also write each kernel's SASS here")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    parser.add_argument("--cuda-only", action="store_true",
                        help="only the nvcc part, printed (report files untouched): for iterating on csrc/cuda")
    parser.add_argument("--cuda-source", type=Path, default=None,
                        help="with --cuda-only: the folder of .cu files to compile (default csrc/cuda)")
    args = parser.parse_args(argv)
    if not _in_pinned_env():  # re-run under the GPU machines' Triton
        python = gpu_toolchain.ensure_env()
        return subprocess.call([str(python), __file__, *(argv if argv is not None else sys.argv[1:])])

    import torch
    import triton

    if args.cuda_only:
        print(format_table(cuda_rows(args.sass_dir, args.cuda_source)))
        return 0
    rows = triton_rows(args.sass_dir)
    cuda = [] if args.no_cuda else cuda_rows(args.sass_dir)
    nvcc_version = "" if args.no_cuda else subprocess.run(["nvcc", "--version"], capture_output=True,
                                                           text=True).stdout.strip().splitlines()[-1]
    header = (f"sm_{CAPABILITY}a static report: triton {triton.__version__}, torch {torch.__version__}"
              f"{', ' + nvcc_version if nvcc_version else ''}")
    text = "\n".join([header, "", *supcon_verdict(rows), *cuda_supcon_verdict(cuda), "", "Triton kernels",
                      format_table(rows), "",
                      "C++/CUDA kernels (nvcc)", format_table(cuda) if cuda else "(skipped)"])
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.txt").write_text(text + "\n")
        (args.out / "report.json").write_text(json.dumps(dict(header=header, triton=rows, cuda=cuda), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
