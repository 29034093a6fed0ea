"""benchmarks/gpu_check.sh --dry-run: the GPU session's one command, rehearsed on the CPU (tiny
sizes, Triton interpreter, no install, no GPU), so that the script and benchmarks/gpu_bench.py
cannot rot between the rare sessions that have a GPU. About 30 s on 2 cores."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "install", "extension", "test_gpu", "conformance", "bench"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu-check"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "GPU_CHECK_"))}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["ok"] is True, log
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == STEPS
    for name in ("env", "test_gpu", "bench"):
        assert steps[name]["status"] == "ok", steps[name]
    for name in ("install", "extension", "conformance"):  # skipped, visibly
        assert steps[name]["status"] == "skipped" and "dry run" in steps[name]["reason"]
    assert "needs a CUDA device" in (out / "test_gpu.log").read_text()
    assert "python" in (out / "env.txt").read_text()

    bench = json.loads((out / "bench.json").read_text())
    assert {"meta", "matmul_bf16", "supcon_large", "supcon_small", "largest_n", "failures"} <= set(bench)
    assert bench["meta"]["dry_run"] is True and bench["failures"] == []
    assert bench["matmul_bf16"]["status"] == "ok" and bench["matmul_bf16"]["flop_per_s"] > 0
    small = {(e["provider"], e["dtype"]): e for e in bench["supcon_small"]}
    assert set(small) == {(p, d) for p in ("reference", "compile", "triton", "cpp") for d in ("float32", "bfloat16")}
    for dtype in ("float32", "bfloat16"):
        for provider in ("reference", "compile", "triton"):
            assert small[provider, dtype]["status"] == "ok", small[provider, dtype]
            assert small[provider, dtype]["time_s"] > 0
        assert small["triton", dtype]["loss_rel_diff_vs_reference"] < 1e-2
        assert small["cpp", dtype]["status"] == "skipped" and small["cpp", dtype]["reason"]
    large = {e["provider"]: e for e in bench["supcon_large"]}
    assert large["triton"]["status"] == "ok" and large["triton"]["fraction_of_matmul_bf16"] > 0
    largest = {e["provider"]: e for e in bench["largest_n"]}
    assert largest["triton"]["largest_n"] >= bench["meta"]["sizes"]["n_large"]
    assert "largest N" in (out / "bench.txt").read_text()
    assert len(list(out.iterdir())) <= 8  # what the device tool hands back
