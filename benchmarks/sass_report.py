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
            if source.name == "per_class_kernels.cu":
                row["_sass"] = chunk  # for per_class_cuda_loops; dropped before the report is written
            found.append(row)
            if sass_dir is not None:
                sass_dir.mkdir(parents=True, exist_ok=True)
                (sass_dir / ("cuda_" + re.sub(r"[^A-Za-z0-9=.]+", "_", nice)[:80] + ".sass")).write_text(chunk)
        rows.extend(sorted(found, key=lambda r: r["kernel"]))
    return rows



# ------------------------------------------------------------------ per-class goodness loss (issue 12)
#
# The hot loops of the per-class kernels move h through the SM once per tile, so the question is
# whether their issue slots fit in the time HBM takes to deliver that h. Budgets per SM per clock
# (H200: 132 SMs, 1.98 GHz boost, 4.8 TB/s): HBM 18.4 B; issue 4 warp instructions (128 thread
# instructions); load/store unit 32 thread instructions (1 warp instruction); tensor cores at the
# dense spec peak (mma.sync reaches less): TF32 1024, bf16/fp16 2048, fp64 139 multiply-adds.
HBM_BYTES_PER_CLK_SM = 4.8e12 / (132 * 1.98e9)
ISSUE_PER_CLK_SM = 128
LSU_PER_CLK_SM = 32
TENSOR_MACS_PER_CLK_SM = {"tf32": 1024, "16bit": 2048, "fp64": 139}
# the per-thread multiply-adds of one MMA instruction, by its shape suffix (m n k / 32 lanes; the
# warpgroup MMAs HGMMA.MxNxK: / 128)
_MMA_SHAPES = {"1684": 16 * 8 * 4, "1688": 16 * 8 * 8, "16816": 16 * 8 * 16, "884": 8 * 8 * 4}
_FLOAT_FMA = ("FFMA", "FFMA2", "HFMA2", "DFMA")
_INTEGER = ("IMAD", "IMUL", "IADD3", "IADD", "VIADD", "LEA", "ISETP", "SHF", "LOP3", "LOP", "IMNMX", "VIMNMX", "SEL",
            "IABS", "SGXT", "BMSK", "PRMT", "MOV", "P2R", "R2P", "PLOP3")


def _kinds(body):
    """Counts of one loop trip by the kind of work: tensor MMA, float FMA, MUFU.EX2, integer,
    load/store, other; and the tensor multiply-adds per thread with their type."""
    kinds = dict(mma=0, float_fma=0, mufu_ex2=0, integer=0, load_store=0, other=0)
    mma_macs, mma_type, mma_ops = 0, None, set()
    for _, op, operands in body:
        base = op.split(".")[0]
        pipe = _aot_pipe(op)
        if pipe == "tensor" and base == "WARPGROUP":  # wgmma fences (arrive / wait): no math
            kinds["other"] += 1
        elif pipe == "tensor":
            kinds["mma"] += 1
            # "DMMA.16x8x16": the SASS parser stops the opcode at the lowercase x (rest in the operands)
            full = op + (operands.split()[0] if operands.startswith("x") else "")
            mma_ops.add(full)
            mnk = re.search(r"\.(\d+)x(\d+)x(\d+)", full)
            lanes = 128 if base in ("HGMMA", "QGMMA", "IGMMA") else 32  # wgmma: one warpgroup's tile
            if mnk:
                mma_macs += int(mnk.group(1)) * int(mnk.group(2)) * int(mnk.group(3)) / lanes
            else:
                shape = next((s for s in full.split(".")[1:] if s in _MMA_SHAPES), None)
                mma_macs += _MMA_SHAPES.get(shape, 0) / 32
            mma_type = "fp64" if base == "DMMA" else ("tf32" if "TF32" in op else "16bit")
        elif base in _FLOAT_FMA:
            kinds["float_fma"] += 1
        elif op.startswith("MUFU.EX2"):
            kinds["mufu_ex2"] += 1
        elif base in _INTEGER:
            kinds["integer"] += 1
        elif pipe == "memory":
            kinds["load_store"] += 1
        else:
            kinds["other"] += 1
    return kinds, mma_macs, mma_type, sorted(mma_ops)


def _aot_pipe(op):
    from ffkern.kernels import _aot

    return _aot.pipe_of(op)


def _innermost_hot_loops(instructions, labels):
    """The innermost loops holding tensor MMAs, else (SIMT kernels) those with 8 or more float FMAs
    and a global load (h or W; the per-sample loss loops read shared memory only)."""
    from ffkern.kernels import _aot

    loops = _aot.loops(instructions, labels)
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    bodies = [(lp, instructions[lp[0]:lp[1] + 1]) for lp in sorted(set(inner))]
    with_mma = [(lp, b) for lp, b in bodies if any(_aot_pipe(op) == "tensor" for _, op, _ in b)]
    if with_mma:
        return with_mma
    return [(lp, b) for lp, b in bodies if sum(op.split(".")[0] in _FLOAT_FMA for _, op, _ in b) >= 8
            and any(op.startswith("LDG") for _, op, _ in b)]


def _per_class_bound(per_element, h_bytes, mma_macs_per_element, mma_type):
    """h elements per clock per SM that each resource allows, and the verdict (the smallest)."""
    rates = {"HBM": HBM_BYTES_PER_CLK_SM / h_bytes,
             "issue": ISSUE_PER_CLK_SM / max(per_element["issued"], 1e-9),
             "load/store": LSU_PER_CLK_SM / max(per_element["load_store"], 1e-9)}
    if mma_macs_per_element:
        rates["tensor"] = TENSOR_MACS_PER_CLK_SM[mma_type] / mma_macs_per_element
    bound = min(rates, key=rates.get)
    return {k: round(v, 2) for k, v in rates.items()}, bound


def _loop_row(body, threads, elements_per_trip, h_bytes):
    from ffkern.kernels import _aot

    kinds, mma_macs, mma_type, mma_ops = _kinds(body)
    by_pipe = {}
    for _, op, _ in body:
        by_pipe[_aot.pipe_of(op)] = by_pipe.get(_aot.pipe_of(op), 0) + 1
    scale = threads / elements_per_trip  # thread instructions per h element
    per_element = {k: round(v * scale, 2) for k, v in kinds.items()}
    per_element["issued"] = round(len(body) * scale, 2)
    rates, bound = _per_class_bound(per_element, h_bytes, mma_macs * scale, mma_type)
    return dict(instructions=len(body), by_pipe=dict(sorted(by_pipe.items())), kinds=kinds, mma_ops=mma_ops,
                elements_per_trip=elements_per_trip, per_element=per_element,
                elements_per_clk_sm=rates, bound=bound)


def per_class_triton_rows(sass_dir: Path | None):
    """Every per-class launch of kernels/per_class_goodness.py (its AOT cases: C=256 K=10 P=64, C=512
    K=100 P=16, C=64 K=10 P=1; fp32 / bf16 / fp64, NCHW / channels-last), with its hot loops: the
    innermost loops holding tl.dot's MMAs; one trip handles an h tile of BLOCK_C x BLOCK_P."""
    os.environ.pop("TRITON_INTERPRET", None)
    from ffkern.kernels import _aot, per_class_goodness

    rows = []
    for what, launch in per_class_goodness.aot_launch_cases():
        compiled = _aot.compile_launch(launch, CAPABILITY)
        res = _aot.ptxas_resources(compiled, CAPABILITY)
        text = _aot.sass_text(compiled, CAPABILITY)
        meta = launch.meta
        h_bytes = 8 if "float64" in what else (2 if "bfloat16" in what else 4)
        elements = meta["BLOCK_C"] * meta["BLOCK_P"]
        instructions, labels = _aot.parse_sass(text)
        loops = [_loop_row(body, res.threads, elements, h_bytes) for _, body in _innermost_hot_loops(instructions, labels)]
        rows.append(dict(kernel=what, registers=res.registers, spill_stores=res.spill_stores,
                         spill_loads=res.spill_loads, shared=res.shared, threads=res.threads,
                         ctas_per_sm=res.ctas_per_sm,
                         tile={k: v for k, v in meta.items() if k in ("K_PAD", "BLOCK_C", "BLOCK_P", "ONE_C", "num_warps")},
                         hot_loops=loops))
        if sass_dir is not None:
            sass_dir.mkdir(parents=True, exist_ok=True)
            (sass_dir / (re.sub(r"[^A-Za-z0-9=.]+", "_", what) + ".sass")).write_text(text)
    return rows


# csrc/cuda/per_class_kernels.cu: a thread handles one h element per channel step of its loops,
# with one 16-class chunk (kPerClassChunk) of multiply-adds on it: h elements per trip = float
# FMAs / 16 (the dh loop of the backward: one FMA per class; counted the same way, per 16 FMAs).
PER_CLASS_CHUNK = 16


def per_class_cuda_loops(cuda):
    """The hot loops of the per-class CUDA kernels from cuda_rows' SASS (kept in the rows as
    ``_sass``): innermost loops with 8 or more float FMAs, per h element (16 FMAs)."""
    from ffkern.kernels import _aot

    out = []
    for row in cuda:
        if not row["kernel"].startswith("per_class_kernels.cu:") or "_sass" not in row:
            continue
        instructions, labels = _aot.parse_sass(row["_sass"])
        h_bytes = 8 if "<double" in row["kernel"] else (4 if "<float" in row["kernel"] else 2)
        loops = []
        for _, body in _innermost_hot_loops(instructions, labels):
            fmas = sum(op.split(".")[0] in _FLOAT_FMA for _, op, _ in body)
            # per thread: elements per trip = fmas / 16, and threads = 1 (per-thread counts)
            loops.append(_loop_row(body, 1, fmas / PER_CLASS_CHUNK, h_bytes))
        out.append(dict(kernel=row["kernel"], registers=row.get("registers"), spill_stores=row.get("spill_stores"),
                        spill_loads=row.get("spill_loads"), shared=row.get("shared"),
                        ctas_per_sm=row.get("ctas_per_sm"), hot_loops=loops))
    return out


def format_per_class(rows):
    out = [f"{'kernel':62s} {'regs':>4s} {'spill':>7s} {'smem':>6s} {'cta':>3s}  hot loop (per h element, thread "
           f"instructions): issued | mma fma ex2 int ld/st | h elem/clk/SM by HBM, issue, ld/st, tensor -> bound"]
    for r in rows:
        spill = f"{r.get('spill_stores') or 0}/{r.get('spill_loads') or 0}"
        head = (f"{r['kernel'][:62]:62s} {r.get('registers') or 0:4d} {spill:>7s} {r.get('shared') or 0:6d} "
                f"{r.get('ctas_per_sm', '-')!s:>3s}")
        if not r["hot_loops"]:
            out.append(head + "  (no hot loop found)")
        for i, lp in enumerate(r["hot_loops"]):
            e = lp["per_element"]
            rates = " ".join(f"{v:g}" for v in lp["elements_per_clk_sm"].values())
            out.append(f"{head if i == 0 else ' ' * len(head)}  {e['issued']:6.1f} | {e['mma']:5.2f} {e['float_fma']:5.1f} "
                       f"{e['mufu_ex2']:3.1f} {e['integer']:5.1f} {e['load_store']:5.1f} | {rates} -> {lp['bound']}")
    return "\n".join(out)


def per_class_verdicts(triton, cuda):
    """One line per kernel family: what bounds its hot loop at the realistic shape (C=256, K=10, P=64)."""
    lines = []
    for r in triton + cuda:
        realistic = "C=256 K=10 P=64" in r["kernel"] or r["kernel"].startswith("per_class_kernels.cu:")
        if not realistic or not r["hot_loops"]:
            continue
        worst = min(r["hot_loops"], key=lambda lp: min(lp["elements_per_clk_sm"].values()))
        rates = worst["elements_per_clk_sm"]
        ratio = rates["HBM"] / rates[worst["bound"]]
        what = (f"bandwidth-bound (HBM feeds {rates['HBM']:g} h elements/clk/SM, the smallest rate)"
                if worst["bound"] == "HBM" else
                f"{worst['bound']}-bound: {rates[worst['bound']]:g} h elements/clk/SM against HBM's {rates['HBM']:g}"
                f" ({ratio:.1f}x{', i.e. about balanced' if ratio < 1.15 else ''})")
        lines.append(f"{r['kernel']}: {what}; {worst['per_element']['issued']:.1f} issued per h element "
                     f"({worst['per_element']['load_store']:.1f} load/store, {worst['per_element']['mma']:.2f} MMA)")
    return lines


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
    parser.add_argument("--per-class-only", action="store_true",
                        help="only the per-class kernels (Triton and, unless --no-cuda, nvcc), printed; with --out: "
                             "per_class.txt and per_class.json")
    parser.add_argument("--cuda-source", type=Path, default=None,
                        help="with --cuda-only / --per-class-only: the folder of .cu files (default csrc/cuda)")
    args = parser.parse_args(argv)
    if not _in_pinned_env():  # re-run under the GPU machines' Triton
        python = gpu_toolchain.ensure_env()
        return subprocess.call([str(python), __file__, *(argv if argv is not None else sys.argv[1:])])

    import torch
    import triton

    if args.cuda_only:
        print(format_table(cuda_rows(args.sass_dir, args.cuda_source)))
        return 0
    if args.per_class_only:
        pc = per_class_triton_rows(args.sass_dir)
        pc_cuda = [] if args.no_cuda else per_class_cuda_loops(cuda_rows(args.sass_dir, args.cuda_source))
        text = "\n".join([*per_class_verdicts(pc, pc_cuda), "", format_per_class(pc + pc_cuda)])
        print(text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "per_class.txt").write_text(text + "\n")
            (args.out / "per_class.json").write_text(json.dumps(dict(triton=pc, cuda=pc_cuda), indent=1) + "\n")
        return 0
    rows = triton_rows(args.sass_dir)
    cuda = [] if args.no_cuda else cuda_rows(args.sass_dir)
    pc = per_class_triton_rows(args.sass_dir)
    pc_cuda = per_class_cuda_loops(cuda)
    for row in cuda:
        row.pop("_sass", None)
    nvcc_version = "" if args.no_cuda else subprocess.run(["nvcc", "--version"], capture_output=True,
                                                           text=True).stdout.strip().splitlines()[-1]
    header = (f"sm_{CAPABILITY}a static report: triton {triton.__version__}, torch {torch.__version__}"
              f"{', ' + nvcc_version if nvcc_version else ''}")
    text = "\n".join([header, "", *supcon_verdict(rows), *cuda_supcon_verdict(cuda), "", "Triton kernels",
                      format_table(rows), "",
                      "C++/CUDA kernels (nvcc)", format_table(cuda) if cuda else "(skipped)", "",
                      "Per-class goodness loss (Triton, then C++/CUDA): hot loops per h element",
                      *per_class_verdicts(pc, pc_cuda), format_per_class(pc + pc_cuda)])
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.txt").write_text(text + "\n")
        (args.out / "report.json").write_text(json.dumps(dict(header=header, triton=rows, cuda=cuda,
                                                              per_class=dict(triton=pc, cuda=pc_cuda)), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
