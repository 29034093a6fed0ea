"""The Triton of the GPU machines, pinned in a small environment of its own.

The GPU machines run Triton 3.6.0; CI and the developers' machines resolve a newer one, and what
compiles with one may not compile with the other. This makes (once) a virtual environment that sees
the installed torch and ffkern (--system-site-packages) but has its own triton==3.6.0 (and a
numpy its interpreter accepts), and prints its python. The compile check (tests/) and
benchmarks/sass_report.py compile the kernels with it, for sm_90a, without a GPU.

    python benchmarks/gpu_toolchain.py            # prints the environment's python
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

GPU_TRITON = "3.6.0"
REQUIREMENTS = [f"triton=={GPU_TRITON}", "numpy<2.4"]


def env_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ffkern" / f"triton-{GPU_TRITON}"
    return Path(os.environ.get("FFKERN_GPU_TRITON_ENV", default))


def env_python(path: Path | None = None) -> Path:
    return (path or env_dir()) / "bin" / "python"


def _has_pinned_triton(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import triton, torch; print(triton.__version__)"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == GPU_TRITON


def ensure_env(path: Path | None = None) -> Path:
    """The pinned environment's python, made if it is missing or holds another triton."""
    path = path or env_dir()
    python = env_python(path)
    if _has_pinned_triton(python):
        return python
    venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=True).create(path)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
                   check=True)
    if not _has_pinned_triton(python):
        raise RuntimeError(f"ffkern: {path} was made but does not import triton {GPU_TRITON} beside torch")
    return python


if __name__ == "__main__":
    print(ensure_env(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
