"""Compiles every Triton kernel configuration the launchers use on a GPU, ahead of time, for
sm_80 and sm_90, without a GPU (triton.compile down to cubin with the bundled ptxas). This catches
what the interpreter cannot: GPU-only compile errors and shared memory beyond the device limit.

Run as a script without TRITON_INTERPRET (the test does): prints one line per configuration.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ffkern.kernels import ff_goodness as FF  # noqa: E402
from ffkern.kernels import marginal_supcon as SC  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block (A100, H100)
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}


def compile_kernel(fn, types, constexprs, num_warps, capability):
    names = fn.arg_names
    signature = {}
    for name in names:
        signature[name] = "constexpr" if name in constexprs else types[name]
    const = {(names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=num_warps))


def supcon_configs():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for dim in (128, 256, 512):
            cfg, warps = SC._config(dim, dtype)
            stat = "*fp64" if dtype == torch.float64 else "*fp32"
            common = dict(YR="*i64", YC="*i64", NORM_R=stat, NORM_C=stat, n_rows="i32", n_cols="i32", dim="i32",
                          row_offset="i64", stride_r="i32", stride_c="i32", stride_dz="i32", inv_tau="fp32",
                          margin="fp32")
            fwd = dict(common, ZR=PTR[dtype], ZC=PTR[dtype], LOSS=stat, LSE=stat, NPOS="*i32", NCLIP="*i32")
            # fused normalization writes dL/dx in the input dtype (one feature block) or accumulates fp32
            dz = PTR[dtype] if cfg["SINGLE_D"] else stat
            bwd = dict(common, ZR=PTR[dtype], ZC=PTR[dtype], LSE_R=stat, A_R=stat, B_R=stat, LSE_C=stat,
                       A_C=stat, B_C=stat, DZ=dz)
            # SCALED (fused normalization) is the public path; unscaled rows are the distributed one
            for scaled in ((True, False) if dim == 128 else (True,)):
                consts = dict(cfg, ACC=SC._acc(dtype), PRECISION="tf32" if dtype == torch.float32 else "ieee",
                              SCALED=scaled)
                bwd_types = bwd if scaled else dict(bwd, DZ=stat)
                yield f"supcon fwd {dtype} D={dim} scaled={scaled}", SC._supcon_fwd_kernel, fwd, consts, warps
                yield f"supcon bwd {dtype} D={dim} scaled={scaled}", SC._supcon_bwd_kernel, bwd_types, consts, warps


def ff_configs():
    for dtype in (torch.float32, torch.bfloat16):
        block_b, block_d = FF._blocks(256)
        stat = "*fp32"
        ints = dict(B="i32", T="i32", dim="i32", skip="i32", stride_pb="i64", stride_pt="i32", stride_nb="i64",
                    stride_nt="i32", stride_b="i64", stride_t="i32", stride_db="i64", stride_dt="i32")
        floats = dict(inv_count="fp32", split="i32", gscale="fp32", param="fp32", eps="fp32")
        for loss in (FF.GOODNESS, FF.FF, FF.SYMBA, FF.SFFA):
            types = dict(ints, **floats, HP=PTR[dtype], HN=PTR[dtype], OUT=stat, COEF=stat)
            consts = dict(LOSS=loss, ACC=tl.float32, BLOCK_B=block_b, BLOCK_D=block_d)
            yield f"ff fwd loss={loss} {dtype}", FF._ff_fwd_kernel, types, consts, 4
        types = dict(ints, **floats, H=PTR[dtype], DH=PTR[dtype], C1=stat, C2=stat, SCALE=stat)
        yield f"ff bwd {dtype}", FF._ff_bwd_kernel, types, dict(ACC=tl.float32, BLOCK_B=block_b, BLOCK_D=block_d), 4


def main(capabilities):
    failures = 0
    for capability in capabilities:
        for what, fn, types, consts, warps in [*supcon_configs(), *ff_configs()]:
            try:
                compiled = compile_kernel(fn, types, consts, warps, capability)
                shared = compiled.metadata.shared
                ok = shared <= SHARED_LIMIT[capability]
                print(f"sm_{capability} {what}: shared {shared} B{'' if ok else ' OVER THE LIMIT'}")
                failures += not ok
            except Exception as exc:  # report every configuration, then fail
                print(f"sm_{capability} {what}: FAILED {type(exc).__name__}: {exc}")
                failures += 1
    return failures


if __name__ == "__main__":
    caps = [int(c) for c in sys.argv[1:]] or [80, 90]
    sys.exit(1 if main(caps) else 0)
