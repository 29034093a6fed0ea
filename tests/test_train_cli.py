"""``ffkern train`` end to end on a tiny run: in-process and as ``python -m ffkern``; metrics JSON and plot."""
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    with pytest.raises(SystemExit) as e:  # checked while parsing now
        main(["train", "--epochs", "0", "--no-progress"])
    assert e.value.code == 2 and "argument --epochs: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["train", "--dataset", "no/such/file.npz", "--no-progress"]) == 2
    assert "dataset file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- refused before any work

@pytest.fixture
def no_training(monkeypatch):
    """A refused run must stop before training: training here fails the test (and, before these
    checks existed, the error came only after a whole run)."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started although the command should have been refused")

    monkeypatch.setattr("ffkern.train.trainer.train", refuse)
    monkeypatch.setattr("ffkern.train.pipeline.train_pipeline", refuse)


def _refused(argv, capsys) -> str:
    """Runs ``ffkern train ...``; asserts exit status 2 and returns the error line. Errors found
    while parsing come from argparse (SystemExit, usage first), the others from ffkern/cli.py's
    UsageError handler (return 2, the line alone); either way the last line is the error."""
    try:
        code = main(["train", *TINY, *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("ffkern train: error: "), err
    return line


def _npz(path, n=40, d=16, labels=None, test_labels=None, x=None):
    g = np.random.default_rng(0)
    labels = np.arange(n) % 2 if labels is None else labels
    test_labels = np.arange(6) % 2 if test_labels is None else test_labels
    np.savez(path, x_train=g.random((len(labels), d)) if x is None else x, y_train=labels,
             x_test=g.random((len(test_labels), d)) if x is None else x[:len(test_labels)], y_test=test_labels)
    return str(path)


@pytest.mark.parametrize("case", ["metrics_is_folder", "plot_is_folder", "parent_is_file", "plot_extension",
                                  "plot_no_extension", "same_file"])
def test_output_paths_are_checked_before_training(case, tmp_path, capsys, no_training):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    argv, option, says = {
        "metrics_is_folder": (["--metrics-out", str(tmp_path)], "--metrics-out", "is a folder"),
        "plot_is_folder": (["--plot", str(tmp_path)], "--plot", "is a folder"),
        "parent_is_file": (["--metrics-out", str(a_file / "sub" / "m.json")], "--metrics-out", "is not a folder"),
        "plot_extension": (["--plot", str(tmp_path / "p.xyz")], "--plot", "must end in an extension matplotlib writes"),
        "plot_no_extension": (["--plot", str(tmp_path / "plot")], "--plot", ".png"),
        "same_file": (["--metrics-out", str(tmp_path / "o.png"), "--plot", str(tmp_path / "o.png")], "--plot", "same file"),
    }[case]
    line = _refused(argv, capsys)
    assert option in line and says in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written, no probe left behind


def test_unwritable_output_folder_is_refused(tmp_path, capsys, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes (the /proc case covers root)")
        for target in (locked / "m.json", locked / "new" / "m.json"):  # in it, and in a folder to be made in it
            line = _refused(["--metrics-out", str(target)], capsys)
            assert "--metrics-out" in line and "cannot" in line
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_folder_that_refuses_files_even_to_root(capsys, no_training):
    # /proc passes os.access(W_OK) for root but cannot hold a file: only a real probe sees it.
    line = _refused(["--metrics-out", "/proc/m.json"], capsys)
    assert "--metrics-out" in line and "cannot write in /proc" in line


def test_metrics_write_is_atomic(tmp_path):
    from ffkern.train.metrics import write_metrics

    path = tmp_path / "m.json"
    write_metrics(str(path), {"run": 1})
    before = path.read_text()
    with pytest.raises(TypeError):  # json.dump fails half-way through: "run" was already written
        write_metrics(str(path), {"run": 2, "bad": object()})
    assert path.read_text() == before and json.loads(before) == {"run": 1}
    assert os.listdir(tmp_path) == ["m.json"]  # no temporary file left
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # a normal file, not mkstemp's private 0600


def test_plot_write_is_atomic_under_ctrl_c(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    from matplotlib.figure import Figure

    from ffkern.train.metrics import History, plot_history

    history = History(["layer 0"])
    history.layers[0].update(train_loss=[1.0, 0.5], valid_loss=[1.1, 0.6])
    path = tmp_path / "p.png"
    plot_history(str(path), history)
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"

    def interrupted(self, fname, **kwargs):  # half a PNG, then Ctrl-C
        data = b"\x89PNG half"
        if isinstance(fname, (str, os.PathLike)):
            Path(fname).write_bytes(data)
        else:
            fname.write(data)
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plot_history(str(path), history)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["p.png"]


def _small(tmp_path):
    return _npz(tmp_path / "small.npz", labels=np.array([0, 1, 0]), test_labels=np.array([0, 1]))


def _one_class(tmp_path):
    return _npz(tmp_path / "one.npz", labels=np.zeros(40, int), test_labels=np.zeros(6, int))


USER_ERRORS = {  # name: (arguments (a function of tmp_path where a file is needed), words the error line must hold)
    "valid_split_empty": (lambda t: ["--dataset", _small(t)], ["--dataset", "small.npz", "validation split"]),
    "ff_one_class": (lambda t: ["--method", "ff", "--dataset", _one_class(t)], ["'ff'", "at least 2 classes", "one.npz"]),
    "bf16_on_cpu": (["--bf16", "--device", "cpu"], ["--bf16", "GPU"]),
    "vit_on_vectors": (lambda t: ["--model", "vit", "--dataset", _npz(t / "vec.npz")], ["--model vit", "vectors", "vec.npz"]),
    "width_heads": (["--model", "vit", "--width", "10", "--heads", "4"], ["--width", "--heads", "divisible"]),
    "patch_size": (["--model", "vit", "--patch-size", "3"], ["--patch-size", "8x8"]),
    "threads_zero": (["--threads", "0"], ["--threads", ">= 1"]),
    "threads_negative": (["--threads", "-2"], ["--threads", ">= 1"]),
    "lr_nan": (["--lr", "nan"], ["--lr", "> 0"]),
    "margin_range": (["--m0", "3"], ["--m0", "<= 2"]),
    "cuda_without_gpu": (["--device", "cuda"], ["--device cuda", "no CUDA device"]),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_are_one_line(case, tmp_path, capsys, no_training):
    if case == "cuda_without_gpu" and torch_cuda():
        pytest.skip("a CUDA device is present")
    argv, words = USER_ERRORS[case]
    line = _refused(argv(tmp_path) if callable(argv) else argv, capsys)
    assert all(w in line for w in words), line


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "npy", "pickle", "object_array", "folder"])
def test_unusable_dataset_file_is_one_line_naming_it(kind, tmp_path, capsys, no_training):
    path = tmp_path / f"{kind}.npz"
    good = _npz(tmp_path / "good.npz")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("x_train,y_train\n1,2\n")
    elif kind == "truncated":
        data = Path(good).read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(Trap(str(tmp_path / "unpickled"))))
    elif kind == "object_array":
        np.savez(path, x_train=np.array([Trap(str(tmp_path / "unpickled"))] * 40, dtype=object), y_train=np.arange(40) % 2,
                 x_test=np.zeros((6, 4)), y_test=np.arange(6) % 2)
    elif kind == "folder":
        path.mkdir()
    line = _refused(["--dataset", str(path)], capsys)
    assert "--dataset" in line and str(path) in line
    assert not (tmp_path / "unpickled").exists()  # nothing was ever unpickled


class Trap:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_huge_label_values_are_remapped_not_allocated(tmp_path, capsys):
    # Labels 0 and 2**40: used as class indices they sized a head of 2**40 outputs (70 TB).
    big = 2 ** 40
    path = _npz(tmp_path / "ids.npz", labels=(np.arange(40) % 2) * big, test_labels=(np.arange(6) % 2) * big)
    metrics = tmp_path / "m.json"
    assert main(["train", *TINY, "--dataset", path, "--metrics-out", str(metrics)]) == 0, capsys.readouterr().err
    assert "2 classes" in capsys.readouterr().out
    assert 0.0 <= json.loads(metrics.read_text())["test_accuracy"] <= 1.0


@pytest.mark.skipif(torch_cuda(), reason="on a GPU the triton backend can run")
def test_triton_backend_on_cpu_is_one_line(tmp_path):
    pytest.importorskip("triton", reason="the error is about triton on the CPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for the kernel tests
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "ffkern", "train", *TINY[:-3], "--backend", "triton", "--device", "cpu",
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ffkern train: error: --backend triton: "), proc.stderr
    assert "TRITON_INTERPRET" in lines[0] and "test accuracy" not in proc.stdout


# ---- runs that would learn nothing are refused or warned about (issue 11, item 11) ------------------


@pytest.mark.parametrize("case,args,message", [
    ("cff_batch_of_one", ["--batch-size", "1"], "method 'cff' with batch_size 1 (--batch-size): a batch of one"
                                                 " sample has no negatives"),
    ("zero_features", ["--dataset", "ZERO"], "has samples of shape [0]: 0 input values"),
])
def test_runs_that_learn_nothing_are_refused(case, args, message, tmp_path, capsys, no_training):
    if "ZERO" in args:
        args = ["--dataset", _npz(tmp_path / "empty.npz", x=np.zeros((40, 0)))]
    assert main(["train", *TINY, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ffkern train: error: ") and message in err[-1], err


def test_test_classes_unseen_in_training_are_warned_about(tmp_path, capsys):
    path = _npz(tmp_path / "unseen.npz", labels=np.arange(40) % 2, test_labels=np.arange(6) % 3)  # class 2: test only
    metrics = tmp_path / "m.json"
    assert main(["train", *TINY, "--dataset", path, "--metrics-out", str(metrics)]) == 0
    out = capsys.readouterr().out
    assert "warning: 2 of 6 test samples have classes (2; " in out and "the training set never shows" in out
    assert "3 classes" in out
    assert json.loads(metrics.read_text())["warnings"][0].startswith("2 of 6 test samples")


# ---- --ff-predict-layers (issue 12) --------------------------------------------------------------------


def test_layer_indices_forms():
    from ffkern._cliargs import layer_indices

    assert layer_indices("all", 3) == [0, 1, 2] and layer_indices("last", 3) == [2] and layer_indices("first", 3) == [0]
    assert layer_indices("-1", 4) == [3] and layer_indices("1:", 4) == [1, 2, 3] and layer_indices(":-1", 4) == [0, 1, 2]
    assert layer_indices("::2", 5) == [0, 2, 4] and layer_indices("2,0,-1,0", 4) == [0, 2, 3]
    for bad, says in [("3", "not among the 3 layers"), ("5:", "selects none"), ("x", "is not all, last"),
                      ("1:2:3:4", "not a slice"), ("::0", "step must not be 0"), ("a:", "integers")]:
        with pytest.raises(ValueError, match=says):
            layer_indices(bad, 3)


def test_goodness_prediction_sums_the_chosen_layers():
    import torch

    from ffkern.train.heads import goodness_logits
    from ffkern.train.methods import layer_score
    from ffkern.train.models import build_encoder

    enc = build_encoder("mlp", (1, 4, 4), 3, width=8, depth=3, label_input=True, seed=1)
    x = torch.randn(5, 1, 4, 4)
    per_layer = []
    for c in range(3):
        h = enc.embed_labels(enc.prepare(x), torch.full((5,), c))
        scores = []
        for layer in enc.layers:
            h = layer(h)
            scores.append(layer_score("symba", h, 0, "reference"))
        per_layer.append(torch.stack(scores, 1))
    per_layer = torch.stack(per_layer, 1).detach()  # [N, C, L]
    opts = dict(backend="reference")
    assert torch.allclose(goodness_logits(enc, "symba", x, **opts), per_layer.sum(2))
    assert torch.allclose(goodness_logits(enc, "symba", x, layers=[2], **opts), per_layer[:, :, 2])
    assert torch.allclose(goodness_logits(enc, "symba", x, layers=[0, 1], **opts), per_layer[:, :, :2].sum(2))


def test_ff_predict_layers_reaches_the_metrics(tmp_path):
    metrics = tmp_path / "m.json"
    assert main(["train", "--method", "symba", *TINY, "--ff-predict-layers", "last", "--metrics-out", str(metrics)]) == 0
    head = json.loads(metrics.read_text())["head"]
    assert head["layers"] == [1] and "layers [1] (--ff-predict-layers last)" in head["kind"]


@pytest.mark.parametrize("argv,says", [
    (["--ff-predict-layers", "last"], "method 'cff'"),  # cff predicts with its head
    (["--method", "ff", "--ff-predict", "head", "--ff-predict-layers", "0"], "ff_predict 'head'"),
    (["--method", "ff", "--ff-predict-layers", "2"], "not among the 2 layers"),
])
def test_ff_predict_layers_refusals(argv, says, capsys, no_training):
    line = _refused(argv, capsys)
    assert "--ff-predict-layers" in line and says in line, line


def test_ff_predict_layers_form_is_checked_while_parsing(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--ff-predict-layers", "1:2:3:4"])
    assert "argument --ff-predict-layers" in capsys.readouterr().err


def test_k_shapes_the_margins(tmp_path):
    from ffkern.train.schedules import margin_schedule
    from ffkern.train.trainer import TrainConfig, layer_margins

    cfg = TrainConfig(margin_schedule="parabolic", layers=5, k=2.0).resolved()
    assert layer_margins(cfg) == margin_schedule("parabolic", 5, 0.4, 0.1, k=2.0) != margin_schedule("parabolic", 5, 0.4, 0.1)
    metrics = tmp_path / "m.json"
    argv = [*TINY[:4], "--layers", "3", *TINY[6:], "--margin-schedule", "cosine", "--k", "3", "--metrics-out", str(metrics)]
    assert main(["train", *argv]) == 0
    m = json.loads(metrics.read_text())
    assert [r["margin"] for r in m["layers"]] == pytest.approx(margin_schedule("cosine", 3, 0.4, 0.1, k=3.0))
    assert m["config"]["k"] == 3.0
    with pytest.raises(ValueError, match="k must be"):
        TrainConfig(k=0.0).resolved()


def test_k_out_of_range_is_refused_while_parsing(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--k", "0"])
    assert "argument --k: must be a number > 0" in capsys.readouterr().err


def test_config_fields_are_the_option_names():
    import dataclasses
    import warnings

    from ffkern.cli import build_parser
    from ffkern.train.trainer import TrainConfig

    train_parser = build_parser().subcommands["train"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for action in train_parser._actions:
        if action.dest in fields:  # each option sets the field of its own name
            assert "--" + action.dest.replace("_", "-") in action.option_strings, action.option_strings
    config_dests = {a.dest for a in train_parser._actions if a.dest in fields}
    assert {"layers", "margin_schedule", "crop_pad", "k", "ff_predict_layers", "select_encoder"} <= config_dests
    with warnings.catch_warnings(record=True) as caught:  # the older keywords still work, with a warning
        warnings.simplefilter("always")
        cfg = TrainConfig(depth=4, schedule="cosine")
        assert cfg.layers == 4 and cfg.margin_schedule == "cosine" and cfg.depth == 4 and cfg.schedule == "cosine"
    assert [w.category for w in caught] == [DeprecationWarning] * 4 and "field is layers now" in str(caught[0].message)
    with pytest.raises(TypeError, match="give layers"):
        TrainConfig(depth=3, layers=3)


def test_metrics_config_keeps_the_older_keys(tmp_path):
    metrics = tmp_path / "m.json"
    assert main(["train", *TINY, "--metrics-out", str(metrics)]) == 0
    c = json.loads(metrics.read_text())["config"]
    assert c["layers"] == c["depth"] == 2 and c["margin_schedule"] == c["schedule"] == "linear"


# ---- threads on a busy machine (issue 13) --------------------------------------------------------------


@pytest.fixture
def torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("load,cores,default,expect,says", [
    (2.1, 2, 2, 1, True),  # the loaded 2-core machine of the issue: 1 thread, said
    (0.2, 2, 2, 2, False),  # quiet: torch's choice, nothing said
    (3.4, 8, 8, 5, True),  # 3 cores taken of 8
    (9.0, 4, 4, 1, True),  # more work than cores: still 1
    (0.0, 16, 4, 4, False),  # never more than torch's default
])
def test_threads_fit_the_idle_cores(load, cores, default, expect, says, monkeypatch, torch_threads):
    import torch

    from ffkern.train import trainer

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(trainer, "machine_load", lambda: load)
    monkeypatch.setattr(trainer.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(trainer, "TORCH_DEFAULT_THREADS", default)
    lines = []
    info = trainer.choose_threads(trainer.TrainConfig().resolved(), torch.device("cpu"), lines.append)
    assert info["threads"] == torch.get_num_threads() == expect
    assert info["load_average_1min"] == load and info["cores"] == cores and info["chosen_by"] == "idle cores (load average)"
    assert len(lines) == int(says)
    if says:
        assert f"load average {load:.2f} on {cores} cores" in lines[0] and f"using {expect} CPU thread" in lines[0]
        assert "--threads N" in lines[0]


def test_given_threads_and_omp_num_threads_are_kept(monkeypatch, torch_threads):
    import torch

    from ffkern.train import trainer

    monkeypatch.setattr(trainer, "machine_load", lambda: 50.0)
    lines = []
    info = trainer.choose_threads(trainer.TrainConfig(threads=2).resolved(), torch.device("cpu"), lines.append)
    assert info["threads"] == 2 and info["chosen_by"] == "--threads" and not lines
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    info = trainer.choose_threads(trainer.TrainConfig().resolved(), torch.device("cpu"), lines.append)
    assert info["chosen_by"] == "OMP_NUM_THREADS" and not lines


def test_the_choice_and_the_load_are_in_the_metrics(tmp_path, monkeypatch, capsys, torch_threads):
    from ffkern.train import trainer

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(trainer, "machine_load", lambda: 7.5)
    metrics = tmp_path / "m.json"
    assert main(["train", *TINY, "--device", "cpu", "--metrics-out", str(metrics)]) == 0
    assert "the machine is busy (load average 7.50" in capsys.readouterr().out or trainer.TORCH_DEFAULT_THREADS == 1
    m = json.loads(metrics.read_text())
    assert m["threads"]["load_average_1min"] == 7.5 and m["threads"]["threads"] == m["torch_threads"] == 1


def test_cpu_runs_reuse_freed_memory_and_say_so(tmp_path, torch_threads):
    from ffkern import cpu_heap

    metrics = tmp_path / "m.json"
    assert main(["train", *TINY, "--device", "cpu", "--threads", "1", "--metrics-out", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    assert m["config"]["cpu_heap"] is True
    assert m["threads"]["cpu_heap_reuse"] is (cpu_heap.unavailable_reason() is None) is cpu_heap.applied()
    assert main(["train", *TINY, "--device", "cpu", "--threads", "1", "--no-cpu-heap", "--metrics-out", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["config"]["cpu_heap"] is False  # asked for nothing; an earlier run's setting stays


@pytest.mark.parametrize("args,flag", [(["--method", "sffa", "--model", "vit", "--sffa-topk", "5"], "--sffa-topk"),
                                       (["--method", "cff", "--ff-label", "pattern"], "--ff-label"),
                                       (["--method", "cff", "--model", "vit", "--vit-l2"], "--vit-l2")])
def test_seed_code_options_are_refused_where_they_do_not_apply(args, flag, capsys):
    assert main(["train", *args, "--epochs", "1", "--no-progress"]) == 2
    assert flag in capsys.readouterr().err


def test_sffa_on_the_mlp_defaults_to_its_authors_layer_and_labels():
    from ffkern.train.data import load_dataset
    from ffkern.train.models import TopKHalves
    from ffkern.train.trainer import TrainConfig, build_model

    data = load_dataset("digits", 0)
    enc = build_model(TrainConfig(method="sffa", width=40, layers=2).resolved(), data)
    assert [m.k for m in enc.modules() if isinstance(m, TopKHalves)] == [15, 15] and enc.label_encoding == "pattern"
    enc = build_model(TrainConfig(method="sffa", width=40, layers=2, sffa_topk=0, ff_label="onehot").resolved(), data)
    assert not any(isinstance(m, TopKHalves) for m in enc.modules()) and enc.label_encoding == "onehot"
