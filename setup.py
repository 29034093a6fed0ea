"""Packaging: the Triton sources in kernels/ are installed as ``ffkern.kernels`` (never as a
top-level ``kernels`` module).

The C++/CUDA sources in csrc/ ship as package data ``ffkern/_csrc``: the "cpp" backend compiles
them just in time on first use (ffkern/cpp/build.py). Ahead of time, with

    FFKERN_BUILD_EXT=1 pip install --no-build-isolation .

they are compiled here into ``ffkern._C`` (with the CUDA kernels when torch has CUDA and nvcc is
found; FFKERN_BUILD_CUDA=0 builds CPU only). Only then is torch imported at build time; the default
build is pure Python.
"""
import os

from setuptools import find_packages, setup

CSRC_DATA = ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h", "cuda/*.cpp"]


def extension_options():
    if os.environ.get("FFKERN_BUILD_EXT", "0") != "1":
        return {}
    import importlib.util
    from pathlib import Path

    try:
        import torch
        from torch.utils import cpp_extension
    except ModuleNotFoundError as exc:  # the isolated build's fresh environment has no torch
        raise SystemExit(
            "ffkern: FFKERN_BUILD_EXT=1 compiles the C++/CUDA extension against the torch already installed, but "
            f"this build environment cannot import torch ({exc}). Install torch first, then build without isolation: "
            "pip install torch && FFKERN_BUILD_EXT=1 pip install --no-build-isolation .") from exc

    # The flag and source lists of the JIT build, from ffkern/cpp/build.py (loaded by path, so that
    # the ffkern package itself is not imported here).
    spec = importlib.util.spec_from_file_location("_ffkern_build", os.path.join("ffkern", "cpp", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("FFKERN_BUILD_CUDA", "1") != "0")
    sources = [p.as_posix() for p in build.sources(Path("csrc"), with_cuda)]
    compile_args = {"cxx": build.cxx_flags()}
    if with_cuda:
        compile_args["nvcc"] = build.cuda_flags()
    extension = (cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension)(
        "ffkern._C", sources, extra_compile_args=compile_args, extra_link_args=build.ld_flags())
    return {"ext_modules": [extension], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    packages=find_packages(include=["ffkern", "ffkern.*"]) + ["ffkern.kernels", "ffkern._csrc"],
    package_dir={"ffkern": "ffkern", "ffkern.kernels": "kernels", "ffkern._csrc": "csrc"},
    package_data={"ffkern._csrc": CSRC_DATA},
    **extension_options(),
)
