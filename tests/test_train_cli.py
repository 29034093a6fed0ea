"""``ffkern train`` end to end on a tiny run: in-process and as ``python -m ffkern``; metrics JSON and plot."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ffkern.cli import main

pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn")
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--width", "32", "--layers", "2", "--head-epochs", "2", "--backend", "reference", "--no-progress"]


def test_train_writes_metrics_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    metrics, plot = tmp_path / "out" / "m.json", tmp_path / "p.png"
    assert main(["train", *TINY, "--seed", "3", "--metrics-out", str(metrics), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and "train clipped" in text  # the per-layer table
    m = json.loads(metrics.read_text())
    for key in ("test_accuracy", "valid_accuracy", "layers", "wall_time_s", "backend", "device", "config"):
        assert key in m, key
    assert 0.5 < m["test_accuracy"] <= 1.0  # digits, even after 2 tiny epochs: chance is 0.1
    assert m["backend"] == "reference" and m["config"]["seed"] == 3 and m["config"]["method"] == "cff"
    assert m["wall_time_s"] > 0 and len(m["layers"]) == 2
    for rec in m["layers"]:
        assert len(rec["train_loss"]) == 2 and all(math.isfinite(v) for v in rec["train_loss"] + rec["valid_loss"])
        assert all(0.0 <= v <= 1.0 for v in rec["train_clipped_fraction"] + rec["valid_clipped_fraction"])
    assert [rec["margin"] for rec in m["layers"]] == pytest.approx([0.4, 0.1])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_python_dash_m_ffkern_train(tmp_path):
    metrics = tmp_path / "m.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ffkern", "train", "--method", "symba", *TINY, "--metrics-out", str(metrics)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "symba on mlp" in proc.stdout and "test accuracy" in proc.stdout
    m = json.loads(metrics.read_text())
    assert m["method"] == "symba" and m["layers"][0]["train_clipped_fraction"] == [None, None]


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "hebbian"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main(["train", "--epochs", "0", "--no-progress"]) == 2
    assert "error: epochs must be an int >= 1" in capsys.readouterr().err
    assert main(["train", "--dataset", "no/such/file.npz", "--no-progress"]) == 2
    assert "dataset file not found" in capsys.readouterr().err
