"""The layer pipeline (ffkern.train.pipeline) against the sequential trainer: same seed, same
per-layer loss history (train and valid losses, clipped fractions), same head and test accuracy,
bit for bit on CPU/gloo, for the MLP, the ViT and the conv models (BatchNorm's running statistics,
the learned label channel and sff's per-class 1x1 convs are trained on one rank and must reach
rank 0 for the prediction).

Each world (2 and 3 gloo processes, loopback only, one CPU thread each) is started once: this file
run as a script is the worker; it trains every run of its world as a pipeline and saves rank 0's
metrics (and every rank's errors for the refused cases). The sequential runs are made in this
process with one thread too, so both sides do the same float operations. One more test launches
``torchrun --nproc_per_node=2 -m ffkern train --pipeline`` end to end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ffkern.cli import main
from ffkern.train import pipeline, trainer
from ffkern.train.data import batches, load_npz
from ffkern.train.pipeline import check_pipeline, message_plan, split_layers, train_pipeline
from ffkern.train.trainer import TrainConfig, train, valid_batch_size
from spawn_world import spawn_world, worker_env

WORKER_TIMEOUT_S = 240
TINY = dict(epochs=2, batch_size=64, head_epochs=2, backend="reference", device="cpu", threads=1)
# Per world: the runs it trains as a pipeline (name -> TrainConfig fields). Layer splits:
# depth 3 on 2 ranks [[0, 1], [2]]; depth 3 on 3 ranks one each; depth 4 on 3 ranks [[0, 1], [2], [3]];
# the cnn (6 blocks) on 2 ranks [[0, 1, 2], [3, 4, 5]], on 3 ranks two each; resnet18 (8) on 2 ranks 4 each.
# Conv models at 1/16 of their channels (mobilenetv3 1/4): 8x8 maps of 4 to 144 channels, 0.1-2 s a run.
CONV = dict(width=0.0625, lr=1e-2)
RUNS = {
    2: {
        "cff-mlp": dict(method="cff", model="mlp", width=24, layers=3, lr=3e-3),
        "symba-mlp-head": dict(method="symba", model="mlp", width=24, layers=3, lr=3e-3, ff_predict="head"),
        # the last layer's validation loss is lowest at epoch 2 of 4: every rank's layers must go back to
        # then, else the head (trained on all layers but the first) learns other numbers
        "symba-selects-early": dict(method="symba", model="mlp", width=24, layers=3, lr=0.1, epochs=4, batch_size=8,
                                    ff_predict="head"),
        # the defaults of the cnn: BatchNorm over the positives and negatives together, the label map in block 0
        "symba-cnn": dict(method="symba", model="cnn", **CONV),
        "cff-cnn": dict(method="cff", model="cnn", **CONV),
        # sff predicts with the objectives' 1x1 convs and scales, half of them trained on rank 1; the
        # selection goes back to epoch 2 of 4, objectives included
        "sff-resnet18-selects-early": dict(method="sff", model="resnet18", **dict(CONV, lr=0.02), epochs=4,
                                           batch_size=32),
        # try every label over blocks of both ranks (4 is rank 1's)
        "symba-resnet18-some-layers": dict(method="symba", model="resnet18", ff_predict_layers="0,2,4", **CONV),
    },
    3: {
        "cff-vit-oneview": dict(method="cff", model="vit", width=16, layers=3, heads=2, views=1, lr=3e-3),
        "ff-mlp": dict(method="ff", model="mlp", width=24, layers=4, lr=3e-3),
        # channels-last maps go over the wire as they are (the header carries the strides)
        "sffa-cnn-channels-last": dict(method="sffa", model="cnn", channels_last=True, **CONV),
        # 11 blocks [[0..3], [4..7], [8..10]]: squeeze-excite, hard-swish, BatchNorm in every block
        "symba-mobilenetv3": dict(method="symba", model="mobilenetv3", width=0.25, lr=1e-2),
    },
}


def config(**fields) -> TrainConfig:
    return TrainConfig(**{**TINY, **fields})


# ---------------------------------------------------------------- a small dataset (no download)
def write_dataset(path: str) -> None:
    """4 classes of 8x8 one-channel images: a class template plus noise, so that a tiny run
    learns something (accuracies are compared, so they should not all sit at chance)."""
    gen = np.random.default_rng(5)
    templates = gen.normal(size=(4, 1, 8, 8))
    def part(n):
        y = gen.integers(0, 4, n)
        return (templates[y] + 0.8 * gen.normal(size=(n, 1, 8, 8))).astype(np.float32), y.astype(np.int64)
    (xtr, ytr), (xte, yte) = part(220), part(60)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pipeline-data") / "toy.npz")
    write_dataset(path)
    return path


@pytest.fixture
def one_thread():
    """The sequential runs use one CPU thread, as every pipeline process does (a different
    thread count may split reductions differently and change the last bits)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- what prediction is given
@contextlib.contextmanager
def predicted_state(module):
    """Records what stage 2 is given (``module.predict_all``'s encoder and objectives, as copies
    of their state dicts: parameters and buffers) into the yielded dict. The metrics compare only
    what comes out of prediction, which may agree by chance (an accuracy over 60 samples); this
    shows that every trained tensor reached the predicting process."""
    seen = {}
    real = module.predict_all

    def spy(cfg, encoder, run, data, autocast_dtype):
        seen["encoder"] = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        seen["objectives"] = [{k: v.detach().clone() for k, v in layer.objective.state_dict().items()}
                              if isinstance(layer.objective, torch.nn.Module) else None for layer in run.layers]
        return real(cfg, encoder, run, data, autocast_dtype)

    module.predict_all = spy
    try:
        yield seen
    finally:
        module.predict_all = real


def assert_same_state(pipe: dict, seq: dict) -> None:
    assert pipe.keys() == seq.keys() == {"encoder", "objectives"}
    assert pipe["encoder"].keys() == seq["encoder"].keys()
    for key, value in seq["encoder"].items():
        assert torch.equal(pipe["encoder"][key], value), f"encoder {key} differs"
    assert len(pipe["objectives"]) == len(seq["objectives"])
    for l, (p, s) in enumerate(zip(pipe["objectives"], seq["objectives"])):
        assert (p is None) == (s is None) and (p is None or p.keys() == s.keys()), l
        for key in s or {}:
            assert torch.equal(p[key], s[key]), f"objective {l} {key} differs"


# ---------------------------------------------------------------- the worker (one rank)
def _worker(rank: int, world: int, init_file: str, out_dir: str, data_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=WORKER_TIMEOUT_S // 2))
    out = {"runs": {}, "states": {}, "errors": {}}
    for name, fields in RUNS[world].items():
        cfg = config(**fields)
        data = load_npz(data_path, cfg.seed, cfg.valid_fraction)
        with predicted_state(pipeline) as seen:
            out["runs"][name] = train_pipeline(cfg, progress=False, log=lambda s: None, data=data)
        out["states"][name] = seen or None

    data = load_npz(data_path, 0, 0.1)
    refused = {  # every rank must raise the same error (none may be left waiting for another)
        "too_few_layers": config(width=24, layers=world - 1),
        "ranks_disagree": config(width=24, layers=world, seed=1 if rank == world - 1 else 0),
        "bp": config(method="bp", width=24, layers=world),
        "olu": config(method="symba", model="cnn", olu=True, **CONV),
    }
    for name, cfg in refused.items():
        try:
            train_pipeline(cfg, progress=False, log=lambda s: None, data=data, group=dist.group.WORLD)
            out["errors"][name] = None
        except ValueError as err:
            out["errors"][name] = str(err)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


_worlds: dict = {}


def run_world(world: int, data_path: str):
    """Starts ``world`` worker processes once per test session; returns their saved results, or
    a string with the failed workers' output."""
    if world in _worlds:
        return _worlds[world]
    _worlds[world] = spawn_world(__file__, world, [data_path], WORKER_TIMEOUT_S, "ffkern-pipe")
    return _worlds[world]


def world_results(world: int, data_path: str):
    res = run_world(world, data_path)
    if isinstance(res, str):
        pytest.fail(f"pipeline workers failed:\n{res}")
    return res


def assert_same_run(pipe: dict, seq: dict) -> None:
    """Everything learned equals: per-layer histories (exact floats), head, accuracies."""
    assert len(pipe["layers"]) == len(seq["layers"])
    for p, s in zip(pipe["layers"], seq["layers"]):
        for key in s:
            assert p[key] == s[key], f"{s['name']} {key}: pipeline {p[key]} vs sequential {s[key]}"
    assert pipe["head"] == seq["head"]
    assert pipe["test_accuracy"] == seq["test_accuracy"] and pipe["valid_accuracy"] == seq["valid_accuracy"]
    assert pipe["config"] == seq["config"]
    assert pipe["selection"] == seq["selection"]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("world,name", [(w, n) for w in sorted(RUNS) for n in RUNS[w]])
def test_pipeline_equals_sequential(world, name, dataset_path, one_thread):
    results = world_results(world, dataset_path)
    pipe = results[0]["runs"][name]
    assert all(r["runs"][name] is None for r in results[1:]), "only rank 0 returns the metrics"
    cfg = config(**RUNS[world][name]).resolved()
    data = load_npz(dataset_path, cfg.seed, cfg.valid_fraction)
    with predicted_state(trainer) as seen:
        seq = train(cfg, progress=False, log=lambda s: None, data=data)
    assert_same_run(pipe, seq)
    assert_same_state(results[0]["states"][name], seen)
    assert all(r["states"][name] is None for r in results[1:]), "only rank 0 predicts"

    info = pipe["pipeline"]
    assert info["world_size"] == world and info["process_group_backend"] == "gloo"
    assert info["layers_per_rank"] == split_layers(cfg.layers, world)
    assert [r["layers"] for r in info["ranks"]] == info["layers_per_rank"]
    n_train = len(data.y_train)
    assert info["train_steps"] == cfg.epochs * len(list(batches(n_train, cfg.batch_size, 0, 0))) > 0
    assert info["valid_steps"] == cfg.epochs and info["stage1_s"] > 0
    # Guards against a vacuous comparison: the runs learned and the histories are full.
    for rec in seq["layers"]:
        assert len(rec["train_loss"]) == cfg.epochs and len(rec["valid_loss"]) == cfg.epochs
        assert all(v is not None for v in rec["train_loss"] + rec["valid_loss"])
        assert rec["train_loss"][0] != rec["train_loss"][1]
        assert len(rec["valid_fisher"]) == cfg.epochs and all(v is not None for v in rec["valid_fisher"])
        assert rec["probe_test_accuracy"] is not None and rec["probe_valid_fisher"] is not None
    if name.endswith("selects-early"):  # the selection had to go back: a comparison that can fail
        assert seq["selection"]["encoder"]["epoch"] == 2 < cfg.epochs - 1
        if cfg.method == "cff":
            assert all(v is not None for v in rec["train_clipped_fraction"] + rec["valid_clipped_fraction"])
    assert seq["test_accuracy"] > 0.4  # 4 classes: chance is 0.25


def test_the_comparison_can_fail(dataset_path, one_thread):
    """Another seed gives other histories: equality above is not an accident of the data."""
    cfg = config(**RUNS[2]["cff-mlp"])
    data = load_npz(dataset_path, cfg.seed, cfg.valid_fraction)
    pipe = world_results(2, dataset_path)[0]["runs"]["cff-mlp"]
    other = train(config(**{**RUNS[2]["cff-mlp"], "seed": 1}), progress=False, log=lambda s: None, data=data)
    assert pipe["layers"][0]["train_loss"] != other["layers"][0]["train_loss"]


@pytest.mark.parametrize("world", sorted(RUNS))
def test_refused_on_every_rank(world, dataset_path):
    for rank, res in enumerate(world_results(world, dataset_path)):
        errors = res["errors"]
        assert errors["too_few_layers"] is not None and "at least one layer" in errors["too_few_layers"], rank
        assert errors["ranks_disagree"] is not None and "seed" in errors["ranks_disagree"], rank
        assert errors["bp"] is not None and "cannot be pipelined" in errors["bp"], rank
        assert errors["olu"] is not None and "overlapping local updates" in errors["olu"], rank


def test_single_process_pipeline(dataset_path, one_thread):
    """Without torchrun, --pipeline runs as a pipeline of one process (no network)."""
    cfg = config(method="sffa", width=24, layers=2)
    data = load_npz(dataset_path, cfg.seed, cfg.valid_fraction)
    pipe = train_pipeline(cfg, progress=False, log=lambda s: None, data=data)
    seq = train(cfg, progress=False, log=lambda s: None, data=data)
    assert_same_run(pipe, seq)
    assert pipe["pipeline"]["world_size"] == 1 and pipe["pipeline"]["layers_per_rank"] == [[0, 1]]
    import torch.distributed as dist

    assert not dist.is_initialized()  # the group it made for itself is gone


def test_torchrun_end_to_end(dataset_path, tmp_path, one_thread):
    args = ["--dataset", dataset_path, "--epochs", "2", "--batch-size", "64", "--width", "24", "--layers", "3",
            "--head-epochs", "2", "--lr", "0.003", "--backend", "reference", "--device", "cpu", "--no-progress"]
    metrics, plot = tmp_path / "m.json", tmp_path / "p.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ffkern", "train", "--pipeline", *args, "--metrics-out", str(metrics), "--plot", str(plot)]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "2 ranks (gloo), layers per rank [[0, 1], [2]]" in proc.stdout and "test accuracy" in proc.stdout
    pipe = json.loads(metrics.read_text())
    assert pipe["pipeline"]["world_size"] == 2 and pipe["pipeline"]["layers_per_rank"] == [[0, 1], [2]]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # torchrun sets OMP_NUM_THREADS=1 in its workers; the sequential run gets one thread too.
    assert pipe["config"]["probe"] is True and "probe test" in proc.stdout  # the per-layer probe, in the table
    cfg = config(dataset=dataset_path, width=24, layers=3, lr=0.003)
    seq = json.loads(json.dumps(train(cfg, progress=False, log=lambda s: None,
                                      data=load_npz(dataset_path, cfg.seed, cfg.valid_fraction))))
    seq["config"]["threads"] = pipe["config"]["threads"]  # --threads was not given to torchrun's command
    assert_same_run(pipe, seq)


def test_split_layers():
    assert split_layers(3, 1) == [[0, 1, 2]]
    assert split_layers(3, 2) == [[0, 1], [2]]
    assert split_layers(5, 3) == [[0, 1], [2, 3], [4]]
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="only 2 layers"):
        split_layers(2, 3)
    with pytest.raises(ValueError, match="world must be an int >= 1"):
        split_layers(3, 0)


def test_message_layouts():
    """What a message sends is the tensor's memory as it is, when that is one block with the
    samples one after the other (contiguous or channels-last maps); else a contiguous copy."""
    from ffkern.train.pipeline import _dense, _sendable

    x = torch.zeros(4, 3, 5, 5)
    assert _sendable(x) and _sendable(x.contiguous(memory_format=torch.channels_last))
    assert _sendable(x[:1].expand(1, 3, 5, 5)) and _sendable(torch.zeros(4, 3, 1, 1).as_strided((4, 3, 1, 1), (3, 1, 3, 3)))
    assert not _sendable(x[:, :2]) and not _sendable(x[::2]) and not _sendable(x.transpose(0, 1))  # gaps, batch inside
    assert _dense((3, 5), (1, 3)) and not _dense((4, 3), (0, 1)) and not _dense((2, 2), (1, 1))  # expanded, overlapping


def test_check_pipeline_refuses_bp():
    with pytest.raises(ValueError, match="'bp'.*cannot be pipelined"):
        check_pipeline(TrainConfig(method="bp").resolved(), 1)


def test_check_pipeline_refuses_olu_takes_conv_models():
    with pytest.raises(ValueError, match="olu=True.*overlapping local updates.*drop --pipeline"):
        check_pipeline(TrainConfig(method="symba", model="cnn", olu=True).resolved(), 2)
    for model in ("cnn", "resnet18", "mobilenetv3"):
        for method in ("cff", "symba", "ff", "sffa", "sff"):
            check_pipeline(TrainConfig(method=method, model=model).resolved(), 2)


def test_message_plan_follows_the_trainer_order():
    cfg = config(epochs=2, batch_size=50, probe=False)
    plan = message_plan(cfg, 120, 30)
    train_sizes = [len(i) for i in batches(120, 50, 0, 0)]
    valid_sizes = [len(i) for i in batches(30, valid_batch_size(cfg), 0, 0, shuffle=False)]
    epoch = [("train", n) for n in train_sizes] + [("valid", n) for n in valid_sizes]
    assert [(m.split, m.samples) for m in plan] == epoch * 2
    assert [m.epoch for m in plan] == [0] * len(epoch) + [1] * len(epoch)
    assert [i for i, m in enumerate(plan) if m.last_of_epoch] == [len(epoch) - 1, 2 * len(epoch) - 1]
    assert all(not m.last_of_epoch for m in message_plan(cfg, 120, 0) if m.split == "valid")
    # with the probe, each epoch ends with the clean validation set in layer_fisher's slices
    with_probe = message_plan(dataclasses.replace(cfg, probe=True), 120, 1100)
    fisher = [(m.epoch, m.samples, m.last_of_epoch) for m in with_probe if m.split == "fisher"]
    assert fisher == [(e, n, n == 76) for e in (0, 1) for n in (512, 512, 76)]
    assert [m.split for m in with_probe if m.last_of_epoch] == ["fisher", "fisher"]
    assert not [m for m in message_plan(dataclasses.replace(cfg, probe=True), 120, 0) if m.split == "fisher"]


def test_fisher_slices_are_layer_fishers():
    """The pipeline cuts the Fisher pass as probe.layer_fisher (heads.layer_features) does: the
    same slices give the same float operations."""
    from ffkern.train.heads import layer_features
    from ffkern.train.pipeline import FISHER_BATCH
    from ffkern.train.probe import layer_fisher

    for fn in (layer_fisher, layer_features):
        assert inspect.signature(fn).parameters["batch_size"].default == FISHER_BATCH


def test_cli_refuses_before_starting(capsys, monkeypatch):
    assert main(["train", "--pipeline", "--method", "bp", "--no-progress"]) == 2
    assert "cannot be pipelined" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["train", "--pipeline", "--layers", "3", "--no-progress"]) == 2
    assert "4 processes but the model has only 3 layers" in capsys.readouterr().err


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    _, _, rank_arg, world_arg, init_file_arg, out_dir_arg, data_arg = sys.argv
    _worker(int(rank_arg), int(world_arg), init_file_arg, out_dir_arg, data_arg)
