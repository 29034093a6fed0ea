"""Ahead-of-time compilation of recorded launches for a GPU that is not here.

``compile_launch`` turns a ``_launch.Launch`` (recorded from the real launchers on CPU tensors)
into a CompiledKernel for ``sm_<capability>`` exactly as ``kernel[grid](...)`` would on that GPU:
the argument types, the divisibility-by-16 / equal-to-1 specialization and the constexprs come from
Triton's own binder over the recorded arguments, so integers that fit 32 bits are i32, Python
floats are fp32, and so on. Data pointers are specialized as a GPU allocation would be (aligned):
CPU tensors stand in for the CUDA ones the launcher would have made.

Uses Triton internals (JITFunction binder and _pack_args), which are the same in the Triton of
the GPU machines (3.6) and of CI; a change there fails loudly, not silently.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from ._launch import Launch

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block (A100, H100/H200)
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = {80: 2048, 90: 2048}
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


class _AlignedPtr:
    """Stands in for a CUDA tensor: a 256-byte aligned address (as the caching allocator gives) and
    the recorded tensor's dtype."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype

    @staticmethod
    def data_ptr():
        return 0


def _device_args(args):
    return tuple(_AlignedPtr(a) if isinstance(a, torch.Tensor) else a for a in args)


def compile_launch(launch: Launch, capability: int):
    fn = launch.kernel
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*_device_args(launch.args), **launch.meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(launch.meta), bound_args, specialization,
                                                          options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def signature_of(launch: Launch, capability: int = 90) -> dict:
    """Parameter name -> Triton type as the launch specializes it ("fp32", "i32", "*bf16", ...)."""
    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    _, specialization, _ = binder(*_device_args(launch.args), **launch.meta)
    return {p.name: s[0] for p, s in zip(fn.params, specialization)}


@dataclass
class Resources:
    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack: int
    shared: int  # bytes per CTA (static + dynamic, Triton's figure)
    threads: int
    ctas_per_sm: int


def ptxas_resources(compiled, capability: int) -> Resources:
    """Registers and spills from ptxas -v on the kernel's PTX (the driver reports them only on
    load, and there is no GPU here); shared memory from Triton; CTAs per SM from all three."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    threads = compiled.metadata.num_warps * 32
    shared = compiled.metadata.shared
    # registers are allocated per warp in units of 256 (8 per thread)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGISTERS_PER_SM // per_warp) // compiled.metadata.num_warps
    by_threads = MAX_THREADS_PER_SM[capability] // threads
    by_shared = SHARED_PER_SM[capability] // (shared + 1024) if shared else 32  # 1 KB reserved per CTA
    return Resources(regs, int(spill.group(1)), int(spill.group(2)), int(stack.group(1)) if stack else 0, shared,
                     threads, min(by_regs, by_threads, by_shared, 32))


# ------------------------------------------------------------------ what the launchers launch

SUPCON_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SUPCON_DIMS = (64, 128, 256, 300, 512)


def _record(fn):
    from ._launch import record_launches

    with record_launches() as launches:
        fn()
    return launches


def supcon_launches(dtype, dim, n=8192, temperature=0.15, margin=0.4, scaled=True, fp32_precision="highest",
                    labels_dtype=torch.int64):
    """The forward and backward launches of one SupCon call, as the launchers make them on a GPU
    (CPU tensors stand in: shapes, dtypes and scalars are what matter)."""
    from . import marginal_supcon as SC

    x = torch.zeros(n, dim, dtype=dtype)
    labels = (torch.arange(n) % 10).to(labels_dtype)
    stat = SC._stat_dtype(dtype)
    norm = torch.ones(n, dtype=stat) if scaled else None
    vec = torch.zeros(n, dtype=stat)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(fp32_precision)
    try:
        return _record(lambda: (
            SC.supcon_forward(x, labels, x, labels, 0, temperature, margin, norm, norm, unit_rows=not scaled),
            SC.supcon_backward(x, labels, x, labels, 0, vec, vec, vec, vec, vec, vec, temperature, margin, norm, norm,
                               unit_rows=not scaled)))
    finally:
        torch.set_float32_matmul_precision(old)


def ff_launches(dtype, batch=4096, tokens=1, dim=1024, loss="ff"):
    from . import ff_goodness as FF

    h = torch.zeros(batch, tokens, dim, dtype=dtype) if tokens > 1 else torch.zeros(batch, dim, dtype=dtype)

    def run():
        if loss == "goodness":
            FF.forward(FF.GOODNESS, h, None, None, "mean", 0)
        else:
            _, coef, split, _ = FF.forward(FF.LOSS_IDS[loss], h, h, 2.0, "mean", 0)
            FF.backward(h, coef[0], coef[1], torch.ones(1, dtype=coef.dtype), 0, split)
    return _record(run)


def all_launch_cases():
    """(description, Launch) for every kernel configuration the launchers use on a GPU."""
    for dtype in SUPCON_DTYPES:
        for dim in SUPCON_DIMS:
            variants = [("scaled", dict(scaled=True))]
            if dim == 128:
                variants += [("rows", dict(scaled=False)), ("online", dict(temperature=0.01))]
                if dtype == torch.float32:
                    variants += [("tf32", dict(fp32_precision="high"))]
            for tag, kw in variants:
                for launch_ in supcon_launches(dtype, dim, **kw):
                    yield f"supcon {launch_.name} {str(dtype)[6:]} D={dim} {tag}", launch_
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for loss in ("goodness", "ff", "symba", "sffa"):
            for launch_ in ff_launches(dtype, loss=loss):
                yield f"ff {launch_.name} {str(dtype)[6:]} {loss}", launch_


# ------------------------------------------------------------------ SASS of the hot loop

# Issue classes of Hopper (sm_90) SASS opcodes, by the pipe that executes them (Nsight Compute's
# pipe names). "alu" is the half-rate integer/logic pipe (16 lanes per SM partition against 32 for
# "fma"): compares, selects, min/max, logic, integer adds, fp32->16 packing.
PIPES = {
    "tensor": ("HGMMA", "HMMA", "DMMA", "IMMA", "QGMMA", "WARPGROUP"),
    "mufu": ("MUFU",),
    "fma": ("FFMA", "FADD", "FMUL", "FFMA2", "FADD2", "FMUL2", "HFMA2", "HADD2", "HMUL2", "IMAD", "IMUL", "IDP"),
    "fp64": ("DFMA", "DADD", "DMUL", "DSETP", "DMNMX"),
    "alu": ("IADD3", "IADD", "VIADD", "LOP3", "LOP", "ISETP", "FSETP", "FMNMX", "FSEL", "SEL", "SHF", "LEA", "IMNMX",
            "VIMNMX", "PLOP3", "P2R", "R2P", "F2FP", "FCHK", "PRMT", "SGXT", "BMSK", "FLO", "IABS", "POPC", "HSETP2",
            "HMNMX2", "ICMP", "BREV", "MOV", "IMNMX3", "FMNMX3"),
    "memory": ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LDGDEPBAR", "LD", "ST", "ATOM", "ATOMS", "ATOMG",
               "RED", "REDG", "SHFL", "LDC", "UTMALDG", "UTMASTG", "UBLKCP", "SYNCS", "CCTL", "MATCH"),
    "conversion": ("F2F", "I2F", "F2I", "I2FP", "F2IP", "FRND"),
}
_OPCODE_PIPE = {op: pipe for pipe, ops in PIPES.items() for op in ops}


def pipe_of(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base in _OPCODE_PIPE:
        return _OPCODE_PIPE[base]
    if base.startswith("U"):
        return "uniform"  # the uniform datapath: one per warp, beside the vector pipes
    return "control"  # branches, barriers, S2R, NOP, ...


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL_LINE = re.compile(r"^\s*\.(L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\(\.(L_x_\d+)\)|\b0x([0-9a-f]+)\b")


def cuobjdump_path(capability: int = 90) -> str:
    """The cuobjdump that ships beside Triton's ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    return str(Path(get_ptxas(capability).path).with_name("cuobjdump"))


def sass_text(compiled, capability: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return subprocess.run([cuobjdump_path(capability), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout


def parse_sass(text: str):
    """[(address, opcode, operands)] and {label: address} of one kernel's SASS."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL_LINE.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _SASS_LINE.search(line)
        if m:
            address = int(m.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instructions.append((address, m.group(3), m.group(4)))
    return instructions, labels


def loops(instructions, labels):
    """(first, last) instruction index of every loop: a branch back to an earlier label."""
    index = {addr: i for i, (addr, _, _) in enumerate(instructions)}
    found = []
    for i, (addr, op, operands) in enumerate(instructions):
        if not op.startswith("BRA"):
            continue
        target = _BRANCH_TARGET.search(operands)
        if not target:
            continue
        dest = labels.get(target.group(1)) if target.group(1) else int(target.group(2), 16)
        if dest is not None and dest <= addr and dest in index:
            found.append((index[dest], i))
    return found


@dataclass
class HotLoop:
    instructions: int  # per thread, one trip
    by_pipe: dict
    per_pair: float  # issued instructions per (row, column) pair: instructions * threads / tile pairs
    per_pair_by_pipe: dict
    nested: bool  # the loop holds an inner loop (wide D): per-pair figures are for its outer trip only


def hot_loop(text: str, threads: int, pairs_per_trip: int) -> HotLoop | None:
    """The column sweep's interior body: the smallest loop that evaluates exponentials (the masked
    diagonal and tail loops are larger, the interior ones identical)."""
    instructions, labels = parse_sass(text)
    candidates = []
    for first, last in loops(instructions, labels):
        body = instructions[first:last + 1]
        if any(op.startswith("MUFU.EX2") for _, op, _ in body):
            inner = [lp for lp in loops(instructions, labels) if first <= lp[0] and lp[1] < last and lp != (first, last)]
            candidates.append((len(body), body, bool(inner)))
    if not candidates:
        return None
    _, body, nested = min(candidates, key=lambda c: c[0])
    by_pipe = {}
    for _, op, _ in body:
        by_pipe[pipe_of(op)] = by_pipe.get(pipe_of(op), 0) + 1
    scale = threads / pairs_per_trip
    return HotLoop(len(body), by_pipe, len(body) * scale, {k: v * scale for k, v in sorted(by_pipe.items())}, nested)
