"""``ffkern bench`` refuses bad values before measuring anything: one ``ffkern bench: error:``
line (argparse's, or ffkern/cli.py's for what only the command can check), exit status 2."""
import os

import pytest
import torch

from ffkern.bench import report
from ffkern.bench.cli import _size
from ffkern.bench.sweep import SweepConfig
from ffkern.cli import main

BASE = ["bench", "--quick", "--device", "cpu", "--what", "supcon", "--providers", "reference"]


@pytest.fixture
def no_sweep(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the sweep started although the command should have been refused")

    monkeypatch.setattr("ffkern.bench.sweep.run_sweep", refuse)


BAD = {  # name: (arguments, words the error line must hold)
    "n_zero": (["--n", "0"], ["--n"]),
    "n_negative": (["--n", "-4"], ["--n"]),
    "n_fraction": (["--n", "2^-1"], ["--n"]),
    "n_astronomic": (["--n", "2^99999999"], ["--n", "2^62"]),  # refused without computing the number
    "d_zero": (["--d", "0"], ["--d", ">= 2"]),
    "ff_d_zero": (["--ff-d", "0"], ["--ff-d", ">= 1"]),  # was a ZeroDivisionError
    "ff_sizes_not_multiple": (["--ff-sizes", "1000"], ["ff_sizes", "ff_d"]),
    "repeats_zero": (["--repeats", "0"], ["--repeats"]),
    "warmup_negative": (["--warmup", "-1"], ["--warmup"]),
    "rep_ms_zero": (["--rep-ms", "0"], ["--rep-ms"]),  # was accepted
    "max_mem_negative": (["--max-mem-gb", "-1"], ["--max-mem-gb"]),  # was accepted: every size skipped
    "max_total_nan": (["--max-total-s", "nan"], ["--max-total-s"]),
    "threads_zero": (["--threads", "0"], ["--threads", ">= 1"]),  # was accepted
    "e2e_batch_zero": (["--e2e-batch", "0"], ["--e2e-batch"]),  # was silently the default 512
    "e2e_width_heads": (["--what", "e2e", "--e2e-width", "10", "--e2e-heads", "4"], ["--e2e-width", "--e2e-heads"]),
    "unknown_provider": (["--providers", "nope"], ["--providers", "invalid choice"]),
    "unknown_compile_backend": (["--providers", "compile", "--compile-backend", "nope"], ["--compile-backend", "'nope'"]),
    "tag_up": (["--tag", "../.."], ["--tag"]),
    "tag_separator": (["--tag", "a/b"], ["--tag"]),
    "tag_dots": (["--tag", "x..y"], ["--tag"]),
    "tag_empty": (["--tag", ""], ["--tag"]),
    "cuda_without_gpu": (["--device", "cuda"], ["--device cuda", "no CUDA device"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_are_one_line_before_any_measurement(case, tmp_path, capsys, no_sweep):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    argv, words = BAD[case]
    try:
        code = main([*BASE, "--out", str(tmp_path), *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("ffkern bench: error: ") and all(w in line for w in words), line
    assert os.listdir(tmp_path) == []


def test_out_must_be_a_writable_folder(tmp_path, capsys, no_sweep):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(SystemExit) as e:
            main([*BASE, "--out", str(out)])
        assert e.value.code == 2 and "argument --out:" in capsys.readouterr().err


def test_tag_cannot_leave_the_results_root_from_python_either(tmp_path):
    with pytest.raises(ValueError, match="tag"):
        SweepConfig(tag="../../elsewhere").check()
    results = {"meta": {"device": "cpu x", "device_type": "cpu", "tag": "../.."}}
    with pytest.raises(ValueError, match="tag"):
        report.results_dir(str(tmp_path), results)
    results["meta"]["tag"] = "quick"
    assert report.results_dir(str(tmp_path), results) == os.path.join(str(tmp_path), "cpu-x", "quick")


def test_sizes_parse_as_before():
    assert _size("2^16") == 65536 and _size("2**10") == 1024 and _size("300") == 300


def test_committed_results_are_never_overwritten(tmp_path, monkeypatch, capsys):
    """`ffkern bench --quick` run in the clone wrote over committed result files: a folder with
    files git tracks is refused before any measuring (--replace allows it)."""
    import subprocess

    from ffkern.cli import main

    run_dir = tmp_path / "results" / "some-cpu" / "quick"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text("{}")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "results"], check=True)

    def refuse(*args, **kwargs):
        raise AssertionError("the sweep started although the command should have been refused")

    monkeypatch.setattr("ffkern.bench.sweep.run_sweep", refuse)
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert "holds 1 files that git tracks" in err and "--replace" in err
