"""Every method runs a few steps on both models; objectives, FF label embedding, prediction, config checks."""
import math

import pytest
import torch

from ffkern.train import TrainConfig, train
from ffkern.train.data import Dataset
from ffkern.train.heads import goodness_logits
from ffkern.train.methods import first_batch, layer_score, make_objective, wrong_labels
from ffkern.train.models import build_encoder
from ffkern.train import rng


def tiny_data(n_train=120, n_eval=40, seed=0):
    """Random 8x8 images whose class is a bright row: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)

    def part(n):
        y = torch.randint(0, 4, (n,), generator=g)
        x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
        x[torch.arange(n), 0, 2 * y] += 2.0
        return x, y

    (xt, yt), (xv, yv), (xs, ys) = part(n_train), part(n_eval), part(n_eval)
    return Dataset("tiny", xt, yt, xv, yv, xs, ys, 4)


TINY = dict(epochs=2, width=16, depth=2, heads=2, patch_size=4, batch_size=40, head_epochs=3, backend="reference")


@pytest.mark.parametrize("model", ["mlp", "vit"])
@pytest.mark.parametrize("method", ["cff", "ff", "symba", "sffa", "bp"])
def test_each_method_runs(method, model):
    m = train(TrainConfig(method=method, model=model, **TINY), progress=False, log=lambda s: None, data=tiny_data())
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["method"] == method and m["backend"] == "reference"
    layers = m["layers"]
    assert len(layers) == (1 if method == "bp" else 2)
    for rec in layers:
        assert len(rec["train_loss"]) == 2 and len(rec["valid_loss"]) == 2
        assert all(v is not None and math.isfinite(v) for v in rec["train_loss"] + rec["valid_loss"])
        if method == "cff":
            assert all(0.0 <= v <= 1.0 for v in rec["train_clipped_fraction"])
        else:
            assert rec["train_clipped_fraction"] == [None, None]


def test_cff_learns_and_one_forward_mode_runs():
    data = tiny_data(seed=1)
    cfg = dict(TINY, epochs=6)
    two = train(TrainConfig(**cfg), progress=False, log=lambda s: None, data=data)
    one = train(TrainConfig(views=1, **cfg), progress=False, log=lambda s: None, data=data)
    assert two["test_accuracy"] > 0.7 and one["test_accuracy"] > 0.7  # chance is 0.25
    first, last = two["layers"][0]["train_loss"][0], two["layers"][0]["train_loss"][-1]
    assert last < first
    assert [rec["margin"] for rec in two["layers"]] == pytest.approx([0.4, 0.1])


def test_same_seed_same_run():
    a = train(TrainConfig(**TINY), progress=False, log=lambda s: None, data=tiny_data())
    b = train(TrainConfig(**TINY), progress=False, log=lambda s: None, data=tiny_data())
    assert a["layers"] == b["layers"] and a["test_accuracy"] == b["test_accuracy"]


def test_ff_label_embedding_and_negatives():
    mlp = build_encoder("mlp", (1, 4, 4), 3, width=8, depth=1, label_input=True, label_scale=5.0)
    inp = torch.ones(2, 16)
    out = mlp.embed_labels(inp, torch.tensor([2, 0]))
    assert out[0, :3].tolist() == [0, 0, 5] and out[1, :3].tolist() == [5, 0, 0] and (out[:, 3:] == 1).all()
    assert (mlp.embed_labels(inp, None)[:, :3] == 0).all()  # the neutral label
    vit = build_encoder("vit", (1, 4, 4), 3, width=8, depth=1, heads=2, patch_size=2, label_input=True)
    tok = vit.embed_labels(torch.zeros(2, 4, 4), torch.tensor([1, 1]))
    assert tok.shape == (2, 5, 4) and torch.equal(tok[0, 0], vit.label_tokens[1]) and vit.skip_tokens == 1
    y = torch.randint(0, 3, (500,))
    neg = wrong_labels(y, 3, rng.generator(0, 2))
    assert (neg != y).all() and set(neg.tolist()) == {0, 1, 2}


def test_ff_batch_layout_and_objectives():
    enc = build_encoder("mlp", (1, 4, 4), 3, width=8, depth=1, label_input=True)
    x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    b = first_batch("ff", enc, x, y, augment=None, num_views=2, seed=0, epoch=0, step=0)
    assert b.groups == 2 and b.h.shape == (10, 16)
    assert torch.equal(b.h[:5, :3].argmax(1), y) and (b.h[5:, :3].argmax(1) != y).all()
    out = torch.rand(10, 8)
    for method in ("ff", "symba", "sffa"):
        loss, clipped = make_objective(method, enc, None, backend="reference")(out, b)
        assert loss.dim() == 0 and clipped is None
    cff = build_encoder("mlp", (1, 4, 4), 3, width=8, depth=1)
    bc = first_batch("cff", cff, x, y, augment=None, num_views=2, seed=0, epoch=0, step=0)
    assert bc.h.shape == (10, 16) and torch.equal(bc.h[:5], bc.h[5:])
    loss, clipped = make_objective("cff", cff, 0.3, backend="reference")(torch.rand(10, 8), bc)
    assert loss.dim() == 0 and clipped.dim() == 0
    with pytest.raises(ValueError, match="layer-local"):
        first_batch("bp", cff, x, y, augment=None, num_views=1, seed=0, epoch=0, step=0)


def test_goodness_prediction_tries_every_label():
    enc = build_encoder("mlp", (1, 4, 4), 3, width=8, depth=2, label_input=True)
    logits = goodness_logits(enc, "ff", torch.randn(7, 1, 4, 4), backend="reference")
    assert logits.shape == (7, 3) and torch.isfinite(logits).all()
    h = torch.rand(4, 6)
    assert torch.allclose(layer_score("ff", h, backend="reference"), h.pow(2).mean(1))
    assert torch.allclose(layer_score("sffa", h), torch.log(h[:, :3].pow(2).mean(1) + 1e-8) - torch.log(h[:, 3:].pow(2).mean(1) + 1e-8))


def test_config_errors():
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="hebbian").resolved()
    with pytest.raises(ValueError, match="views"):
        TrainConfig(views=3).resolved()
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0).resolved()
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0).resolved()
    with pytest.raises(ValueError, match="bf16"):
        train(TrainConfig(bf16=True, device="cpu", **TINY), progress=False, log=lambda s: None, data=tiny_data())
    with pytest.raises(ValueError, match="patch_size"):
        train(TrainConfig(**{**TINY, "model": "vit", "patch_size": 3}), progress=False, log=lambda s: None, data=tiny_data())
    assert TrainConfig().resolved().backend == "auto" and TrainConfig().resolved().epochs >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast of the layers needs a CUDA device")
def test_bf16_on_gpu_runs():
    m = train(TrainConfig(bf16=True, device="cuda", **TINY), progress=False, log=lambda s: None, data=tiny_data())
    assert all(math.isfinite(v) for v in m["layers"][0]["train_loss"])


def test_pipeline_stage_builders():
    """What a pipeline stage (issue 6) needs: its own group of layers, and rank 0's input stream."""
    from ffkern.train import build_local_layers, build_model, epoch_inputs
    from ffkern.train.trainer import build_augment

    cfg = TrainConfig(**{**TINY, "depth": 3}).resolved()
    data = tiny_data()
    enc = build_model(cfg, data)
    group = build_local_layers(cfg, enc, [1, 2])
    assert [g.index for g in group] == [1, 2] and group[0].module is enc.layers[1]
    assert [g.objective.margin for g in group] == pytest.approx([0.25, 0.1])
    with pytest.raises(ValueError, match="contiguous"):
        build_local_layers(cfg, enc, [0, 2])
    a = list(epoch_inputs(cfg, enc, data, build_augment(cfg, data), epoch=1))
    b = list(epoch_inputs(cfg, build_model(cfg, data), data, build_augment(cfg, data), epoch=1))
    assert len(a) == 3 and all(torch.equal(u.h, v.h) and torch.equal(u.labels, v.labels) for u, v in zip(a, b))
    assert torch.equal(build_model(cfg, data).layers[2][0].weight, enc.layers[2][0].weight)


def test_sffa_objective_applies_the_authors_activity_factor_where_asked():
    from ffkern import sffa_loss
    from ffkern.train.methods import GoodnessObjective, LayerBatch, default_sffa_activity

    assert default_sffa_activity("sffa", "mlp") and default_sffa_activity("sffa", "cnn")
    assert not default_sffa_activity("sffa", "vit") and not default_sffa_activity("ff", "mlp")
    out = torch.relu(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    batch = LayerBatch(out, torch.zeros(4, dtype=torch.long), 1)
    on, off = GoodnessObjective("sffa", sffa_activity=True), GoodnessObjective("sffa")
    h_pos, h_neg = out.chunk(2)
    torch.testing.assert_close(on(out, batch)[0], sffa_loss(h_pos, h_neg, activity_term=True))
    torch.testing.assert_close(off(out, batch)[0], sffa_loss(h_pos, h_neg))
    assert not torch.allclose(on(out, batch)[0], off(out, batch)[0])
