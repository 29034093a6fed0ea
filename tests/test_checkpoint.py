"""Saved runs (issue 13): ``ffkern train --save DIR``, ``--resume DIR`` continues exactly, ``ffkern eval DIR``."""
import json
import pickle

import pytest
import torch

from ffkern.cli import main
from ffkern.train import checkpoint

pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn")
BASE = ["--backend", "reference", "--no-progress", "--threads", "1", "--head-epochs", "2"]
RUNS = {  # name: options (small and fast; digits)
    "cff-mlp": ["--width", "32", "--layers", "2"],
    "symba-mlp": ["--method", "symba", "--width", "32", "--layers", "2"],
    "bp-mlp": ["--method", "bp", "--width", "32", "--layers", "2"],
    "symba-cnn-olu": ["--method", "symba", "--model", "cnn", "--width", "0.0625", "--olu"],
    "sff-cnn": ["--method", "sff", "--model", "cnn", "--width", "0.0625", "--layers", "6"],
}


def _train(argv, capsys=None):
    code = main(["train", *BASE, *argv])
    err = capsys.readouterr().err if capsys is not None else ""
    assert code == 0, err


def _saved(folder):
    return checkpoint.load(folder)


def _assert_same_state(a, b):
    for part in ("modules", "best"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            for key, t in a[part][name].items():
                assert torch.equal(t, b[part][name][key]), (part, name, key)
    for oa, ob in zip(a["optimizers"], b["optimizers"]):
        for pid, st in oa["state"].items():
            for key, t in st.items():
                assert torch.equal(t, ob["state"][pid][key]), ("optimizer", pid, key)
    if a["head"] is not None:
        for key, t in a["head"].items():
            assert torch.equal(t, b["head"][key]), ("head", key)


@pytest.mark.parametrize("name", ["cff-mlp", "symba-mlp", "symba-cnn-olu"])
def test_interrupted_and_resumed_equals_uninterrupted(name, tmp_path, monkeypatch, capsys):
    opts = RUNS[name]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _train([*opts, "--epochs", "3", "--save", str(whole)], capsys)

    real_save = checkpoint.save

    def save_then_stop(folder, meta, tensors):  # Ctrl-C right after epoch 2's checkpoint
        real_save(folder, meta, tensors)
        if meta["epochs_done"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(["train", *BASE, *opts, "--epochs", "3", "--save", str(cut)])
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert _saved(cut)["meta"]["epochs_done"] == 2 and not (cut / "metrics.json").exists()

    _train(["--resume", str(cut), "--no-progress", "--threads", "1"], capsys)  # options from the saved run
    a, b = _saved(whole), _saved(cut)
    assert a["meta"]["history"] == b["meta"]["history"]  # every layer's losses, every epoch, bit for bit
    _assert_same_state(a, b)
    ma, mb = (json.loads((f / "metrics.json").read_text()) for f in (whole, cut))
    assert ma["test_accuracy"] == mb["test_accuracy"] and ma["selection"] == mb["selection"]


def test_extending_a_finished_run_equals_the_longer_run(tmp_path, capsys):
    opts = RUNS["bp-mlp"]
    whole, short = tmp_path / "whole", tmp_path / "short"
    _train([*opts, "--epochs", "3", "--save", str(whole)], capsys)
    _train([*opts, "--epochs", "1", "--save", str(short)], capsys)
    _train(["--resume", str(short), "--epochs", "3"], capsys)
    a, b = _saved(whole), _saved(short)
    assert a["meta"]["history"] == b["meta"]["history"] and b["meta"]["epochs_done"] == 3
    _assert_same_state(a, b)


def test_folder_contents_and_eval(tmp_path, capsys):
    run = tmp_path / "run"
    _train([*RUNS["sff-cnn"], "--epochs", "1", "--save", str(run), "--topk", "3"], capsys)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.json"]
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["method"] == "sff" and config["epochs"] == 1
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--topk", "3", "--metrics-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["test_accuracy"] == metrics["test_accuracy"]  # the saved run, evaluated again: same numbers
    assert result["test_top3_accuracy"] == metrics["test_top3_accuracy"]
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("opts", [RUNS["cff-mlp"], RUNS["bp-mlp"], [*RUNS["symba-mlp"], "--ff-predict", "head"],
                                  [*RUNS["symba-mlp"], "--ff-predict-layers", "last"]], ids=["cff", "bp", "symba-head", "symba-last"])
def test_eval_matches_training(opts, tmp_path, capsys):
    run = tmp_path / "run"
    _train([*opts, "--epochs", "2", "--save", str(run)], capsys)
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--dataset", "digits", "--metrics-out", str(out)]) == 0
    result, metrics = json.loads(out.read_text()), json.loads((run / "metrics.json").read_text())
    assert result["test_accuracy"] == metrics["test_accuracy"] and result["valid_accuracy"] == metrics["valid_accuracy"]


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_resume_refuses_changed_options(tmp_path, capsys):
    run = tmp_path / "run"
    _train([*RUNS["cff-mlp"], "--epochs", "2", "--save", str(run)], capsys)
    line = _error(["train", "--resume", str(run), "--lr", "0.5", "--no-progress"], capsys)
    assert "--lr 0.5 (saved: 0.001)" in line and "differ from the saved run" in line
    line = _error(["train", "--resume", str(run), "--method", "cff", "--width", "64", "--no-progress"], capsys)
    assert "--width 64" in line and "--method" not in line  # cff is the saved method: no conflict
    line = _error(["train", "--resume", str(run), "--epochs", "1", "--no-progress"], capsys)
    assert "--epochs 1 is fewer than the 2 epochs" in line


def test_missing_and_foreign_folders_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nothing"
    assert "no such folder" in _error(["eval", str(missing)], capsys)
    assert "no such folder" in _error(["train", "--resume", str(missing), "--no-progress"], capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    line = _error(["eval", str(foreign)], capsys)
    assert "holds no saved ffkern run" in line and "notes.txt" in line
    torch.save({"weights": torch.zeros(2)}, foreign / "checkpoint.pt")  # a torch file, not ours
    assert "not an ffkern training checkpoint" in _error(["eval", str(foreign)], capsys)
    (foreign / "checkpoint.pt").write_bytes(b"\x80garbage")
    assert "cannot be read as an ffkern checkpoint" in _error(["eval", str(foreign)], capsys)


class Trap:
    """Unpickling this creates a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_with_code_is_refused_unrun(tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "x": Trap(str(tmp_path / "ran"))}))
    assert "cannot be read" in _error(["eval", str(folder)], capsys)
    assert not (tmp_path / "ran").exists()


def test_save_refuses_a_folder_with_another_run_and_eval_an_unfinished_or_other_shape(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _train([*RUNS["cff-mlp"], "--epochs", "1", "--save", str(run)], capsys)
    assert "already holds a saved run" in _error(["train", *BASE, "--save", str(run)], capsys)
    import numpy as np

    npz = tmp_path / "vec.npz"
    g = np.random.default_rng(0)
    np.savez(npz, x_train=g.random((100, 5)), y_train=np.arange(100) % 10, x_test=g.random((10, 5)), y_test=np.arange(10))
    line = _error(["eval", str(run), "--dataset", str(npz)], capsys)
    assert "shape [5]" in line and "trained on digits" in line

    real_save = checkpoint.save

    def stop(folder, meta, tensors):
        real_save(folder, meta, tensors)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", stop)
    with pytest.raises(KeyboardInterrupt):
        main(["train", *BASE, *RUNS["cff-mlp"], "--epochs", "2", "--save", str(tmp_path / "cut")])
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert "stopped after epoch 1 of 2" in _error(["eval", str(tmp_path / "cut")], capsys)


def test_pipeline_refuses_save_and_resume(tmp_path, capsys):
    for option in ("--save", "--resume"):
        line = _error(["train", *BASE, "--pipeline", option, str(tmp_path / "run")], capsys)
        assert "--save and --resume are not offered with --pipeline yet" in line


def test_resume_refuses_other_data(tmp_path, capsys):
    import numpy as np

    g = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=g.random((60, 16)), y_train=np.arange(60) % 3, x_test=g.random((9, 16)), y_test=np.arange(9) % 3)
    run = tmp_path / "run"
    _train(["--dataset", str(path), "--width", "8", "--layers", "1", "--epochs", "1", "--save", str(run)], capsys)
    np.savez(path, x_train=g.random((60, 16)), y_train=(np.arange(60) + 1) % 3, x_test=g.random((9, 16)),
             y_test=np.arange(9) % 3)
    line = _error(["train", "--resume", str(run), "--epochs", "2", "--no-progress"], capsys)
    assert "the dataset differs" in line and "train_labels_crc32" in line


# ---- model selection as CFF does (issue 13) --------------------------------------------------------------


def test_encoder_selector_keeps_the_best_validation_epoch():
    from ffkern.train.metrics import History
    from ffkern.train.trainer import EncoderSelector

    layer = torch.nn.Linear(2, 2)
    history = History(["layer 0", "layer 1"])
    sel = EncoderSelector("best-valid", {"encoder": layer})
    kept = None
    for epoch, (first, last) in enumerate([(0.1, 3.0), (5.0, 1.0), (0.0, 1.0), (0.0, 2.0)]):  # ties keep the first
        with torch.no_grad():
            layer.weight.fill_(epoch)
        history.layers[0]["valid_loss"].append(first)  # only the last layer's loss decides
        history.layers[1]["valid_loss"].append(last)
        sel.update(epoch, history)
        kept = layer.weight.clone() if epoch == 1 else kept
    info = sel.select()
    assert info["epoch"] == 1 and info["valid_loss"] == 1.0 and torch.equal(layer.weight, kept)
    last = EncoderSelector("last", {"encoder": layer})
    last.update(0, history)
    assert last.select()["epoch"] == 0 and last.snapshot is None  # no copy kept at all


def test_selected_encoder_is_the_best_epochs_weights(tmp_path, capsys):
    import numpy as np

    g = np.random.default_rng(0)  # random labels: the validation loss stops falling early (overfitting)
    path = tmp_path / "noise.npz"
    np.savez(path, x_train=g.random((90, 16)), y_train=np.arange(90) % 3, x_test=g.random((9, 16)), y_test=np.arange(9) % 3)
    opts = ["--dataset", str(path), "--width", "64", "--layers", "2", "--lr", "0.03", "--batch-size", "16"]
    run = tmp_path / "run"
    _train([*opts, "--epochs", "6", "--save", str(run)], capsys)
    saved = _saved(run)
    metrics = json.loads((run / "metrics.json").read_text())
    losses = saved["meta"]["history"][-1]["valid_loss"]
    best = min(range(len(losses)), key=lambda e: (losses[e], e))
    assert best < len(losses) - 1  # the case that matters: not the last epoch
    assert metrics["selection"]["encoder"]["epoch"] == best and metrics["selection"]["encoder"]["mode"] == "best-valid"
    short = tmp_path / "short"  # the same training stopped at the best epoch: its last weights are the ones kept
    _train([*opts, "--epochs", str(best + 1), "--select-encoder", "last", "--save", str(short)], capsys)
    for key, t in _saved(short)["modules"]["encoder"].items():
        assert torch.equal(t, saved["best"]["encoder"][key]), key
    head = metrics["head"]
    assert metrics["selection"]["head"]["epoch"] == head["best_epoch"]
    assert head["best_epoch"] == min(range(len(head["valid_loss"])), key=lambda e: (head["valid_loss"][e], e))
    assert head["selected_by"] == "validation cross-entropy" and "valid_accuracy" in head  # the old key stays


def test_without_a_validation_split_the_last_epoch_is_used_and_said():
    import dataclasses

    from ffkern.train.data import load_digits
    from ffkern.train.trainer import TrainConfig, train

    data = load_digits()
    data = dataclasses.replace(data, x_valid=data.x_valid[:0], y_valid=data.y_valid[:0])
    m = train(TrainConfig(epochs=2, width=16, layers=1, head_epochs=2, backend="reference", threads=1), progress=False,
              log=lambda s: None, data=data)
    enc = m["selection"]["encoder"]
    assert enc["epoch"] == 1 and enc["valid_loss"] is None and "no validation split" in enc["criterion"]
    assert m["head"]["best_epoch"] == 1 and m["head"]["selected_by"].startswith("last epoch")
