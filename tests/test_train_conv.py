"""Conv models in the trainer: the Trifecta's cnn, block-wise resnet18 / mobilenetv3, the label
channel, OLU against a hand-written Trifecta loop, sff, and one epoch of every new model/method."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ffkern.train import TrainConfig, train
from ffkern.train.conv_models import CNN_LARGE, CNN_SMALL, LabelChannel, build_conv_encoder, trifecta_block
from ffkern.train.data import Dataset
from ffkern.train.layerwise import make_local_layers, olu_train_step, run_layers
from ffkern.train.methods import GoodnessObjective, LayerBatch, layer_score, make_objective
from ffkern.train.pipeline import check_pipeline

QUIET = dict(progress=False, log=lambda s: None)


def tiny_images(n_train=64, n_eval=32, channels=3, side=8, seed=0):
    """Noisy images whose class (of 4) is a bright row: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)

    def part(n):
        y = torch.randint(0, 4, (n,), generator=g)
        x = 0.3 * torch.randn(n, channels, side, side, generator=g)
        x[torch.arange(n), :, 2 * y] += 2.0
        return x, y

    (xt, yt), (xv, yv), (xs, ys) = part(n_train), part(n_eval), part(n_eval)
    return Dataset("tiny-images", xt, yt, xv, yv, xs, ys, 4)


@pytest.mark.parametrize("kind,depth,side,blocks,out", [
    ("cnn", 6, 8, 6, (64, 1, 1)), ("cnn", 12, 32, 12, (64, 4, 4)),
    ("resnet18", None, 32, 8, (64, 4, 4)), ("mobilenetv3", None, 8, 11, (72, 1, 1)),
])
def test_models_shapes(kind, depth, side, blocks, out):
    enc = build_conv_encoder(kind, (3, side, side), 10, width=0.125, depth=depth, label_input=True)
    assert enc.num_layers == blocks and len(enc.block_channels) == blocks and enc.feature_dim == out[0]
    h = enc.embed_labels(enc.prepare(torch.randn(2, 3, side, side)), torch.tensor([1, 7]))
    assert h.shape == (2, 4, side, side)
    for layer in enc.layers:
        h = layer(h)
    assert tuple(h.shape[1:]) == out and enc.pool(h).shape == (2, out[0])
    assert enc(torch.randn(2, 3, side, side), torch.tensor([0, 1])).shape == (2, out[0])


@pytest.mark.parametrize("kind", ["cnn", "resnet18", "mobilenetv3"])
def test_channels_last_maps_reach_the_losses_without_a_copy(kind):
    from ffkern import flat_features
    from ffkern.train.conv_models import MapLayerNorm

    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 5)
    assert torch.allclose(MapLayerNorm()(x), F.layer_norm(x, x.shape[1:]), atol=1e-5)
    enc = build_conv_encoder(kind, (3, 8, 8), 4, width=0.125, label_input=True).set_channels_last()
    ref = build_conv_encoder(kind, (3, 8, 8), 4, width=0.125, label_input=True)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    h, g = enc.embed_labels(enc.prepare(x), y), ref.embed_labels(ref.prepare(x), y)
    for layer, plain in zip(enc.layers, ref.layers):
        h, g = layer(h), plain(g)
        assert h.is_contiguous(memory_format=torch.channels_last) and flat_features(h).data_ptr() == h.data_ptr()
    # The same network in the other layout (float32 sums in another order, through up to 11 blocks
    # with batch norm over 4 samples: differences up to 1e-4 of values up to 5 seen)
    assert torch.allclose(h, g, rtol=1e-3, atol=1e-3)


def test_cnn_layouts_are_the_trifectas():
    assert [c for c, _ in CNN_SMALL] == [128, 128, 256, 256, 256, 512]
    assert [i for i, (_, pool) in enumerate(CNN_SMALL) if pool] == [0, 2, 5]
    assert [c for c, _ in CNN_LARGE] == [64, 128, 128, 128, 128, 256, 256, 256, 256, 512, 512, 512]
    assert [i for i, (_, pool) in enumerate(CNN_LARGE) if pool] == [1, 5, 9]
    enc = build_conv_encoder("cnn", (1, 8, 8), 10, width=1.0)
    block = enc.layers[1]
    assert isinstance(block[0], torch.nn.BatchNorm2d) and block[1].bias is None and block[1].kernel_size == (3, 3)
    assert isinstance(build_conv_encoder("cnn", (1, 8, 8), 10, width=1.0, norm="layer").layers[1][0], torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="6 blocks"):
        build_conv_encoder("cnn", (1, 8, 8), 10, width=1.0, depth=5)
    with pytest.raises(ValueError, match="too small"):
        build_conv_encoder("cnn", (1, 4, 4), 10, width=1.0)


def test_label_channel_is_a_learned_map_of_block0():
    enc = build_conv_encoder("cnn", (1, 8, 8), 3, width=0.125, label_input=True)
    emb = enc.layers[0][0]
    assert isinstance(emb, LabelChannel) and emb.embedding.weight.shape == (3, 64)
    x = torch.randn(2, 1, 8, 8)
    out = emb(enc.embed_labels(x, torch.tensor([2, 0])))
    assert torch.equal(out[:, :1], x)
    assert torch.equal(out[0, 1], emb.embedding.weight[2].view(8, 8)) and torch.equal(out[1, 1], emb.embedding.weight[0].view(8, 8))
    assert torch.equal(emb(enc.embed_labels(x, None))[:, 1], torch.zeros(2, 8, 8))  # the neutral label
    assert any(p is emb.embedding.weight for p in enc.layers[0].parameters())


def trifecta_inputs(steps, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(b, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (b,), generator=g)
        neg = (y + torch.randint(1, 3, (b,), generator=g)) % 3
        code = torch.cat([y, neg]).float()[:, None, None, None].expand(2 * b, 1, 8, 8)
        out.append((torch.cat([torch.cat([x, x]), code], 1), y))
    return out


def test_olu_equals_a_hand_written_trifecta_loop():
    """Three blocks, four steps: the trainer's OLU gives bit for bit the weights of a loop written
    as the Trifecta's code is (one Adam per block over its own and its predecessor's weights)."""
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(LabelChannel(3, 8, 8), *trifecta_block(2, 4, (8, 8), True, "batch")),
              trifecta_block(4, 6, (4, 4), False, "batch"), trifecta_block(6, 8, (4, 4), True, "batch")]
    hand = copy.deepcopy(blocks)
    layers = make_local_layers(blocks, [GoodnessObjective("symba", backend="reference")] * 3, lr=1e-2, olu=True)
    opts = [torch.optim.Adam(list(hand[0].parameters()), lr=1e-2)] + \
           [torch.optim.Adam(list(hand[i - 1].parameters()) + list(hand[i].parameters()), lr=1e-2) for i in (1, 2)]
    updated = []
    for step, (x, y) in enumerate(trifecta_inputs(4)):
        _, stats = olu_train_step(layers, LayerBatch(x, y, 2), step)
        updated.append([s is not None for s in stats])
        h = x
        for i, block in enumerate(hand):
            block.train()
            out = block(h)
            if (i % 2 == 0) ^ (step % 2 == 0):  # the Trifecta's should_detach
                g = out.pow(2).flatten(1).mean(1)
                pos, neg = g.chunk(2)
                loss = F.softplus(-4.0 * (pos - neg)).mean()
                opts[i].zero_grad()
                loss.backward()
                opts[i].step()
                h = out.detach()
            else:
                h = out
    assert updated == [[False, True, False], [True, False, True]] * 2
    for mine, theirs in zip(blocks, hand):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name


def test_blockwise_resnet18_equals_a_loop_that_detaches():
    torch.manual_seed(1)
    enc = build_conv_encoder("resnet18", (1, 8, 8), 4, width=0.125)
    objectives = [make_objective("sff", enc, None, layer=l, seed=0, backend="reference") for l in range(enc.num_layers)]
    ref_blocks, ref_obj = copy.deepcopy(list(enc.layers)), copy.deepcopy(objectives)
    layers = make_local_layers(list(enc.layers), objectives, lr=1e-3)
    opts = [torch.optim.AdamW(list(b.parameters()) + list(o.parameters()), lr=1e-3, weight_decay=0.0)
            for b, o in zip(ref_blocks, ref_obj)]
    g = torch.Generator().manual_seed(2)
    for step in range(2):
        batch = LayerBatch(torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g), 1)
        run_layers(layers, batch, train=True)
        h = batch.h
        for block, obj, opt in zip(ref_blocks, ref_obj, opts):
            block.train()
            out = block(h.detach())
            loss, _ = obj(out, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            h = out.detach()
    for mine, theirs in zip(enc.layers, ref_blocks):
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()):
            assert torch.equal(a, b)
    for mine, theirs in zip(objectives, ref_obj):
        for a, b in zip(mine.parameters(), theirs.parameters()):
            assert torch.equal(a, b)


def test_layer_score_on_maps_is_the_trifecta_goodness():
    h = torch.randn(3, 4, 2, 2).relu()
    assert torch.allclose(layer_score("symba", h, backend="reference"), h.square().mean((1, 2, 3)))
    assert layer_score("sffa", h.contiguous(memory_format=torch.channels_last)).shape == (3,)


TINY = dict(epochs=1, width=0.125, batch_size=32, head_epochs=2, backend="reference", threads=1)
RUNS = [("cnn", "symba", {}), ("cnn", "symba", {"olu": True}), ("cnn", "ff", {"norm": "layer"}), ("cnn", "sffa", {}),
        ("cnn", "cff", {}), ("cnn", "sff", {}), ("cnn", "bp", {}), ("cnn", "symba", {"ff_predict": "head"}),
        ("resnet18", "sff", {}), ("resnet18", "symba", {}), ("resnet18", "bp", {}),
        ("mobilenetv3", "sff", {}), ("mobilenetv3", "cff", {}), ("cnn", "sffa", {"channels_last": True}),
        ("resnet18", "symba", {"channels_last": True, "olu": True}), ("resnet18", "sff", {"ff_predict": "head"})]


@pytest.mark.parametrize("model,method,extra", RUNS, ids=[f"{m}-{t}-{'-'.join(e)}" for m, t, e in RUNS])
def test_one_epoch_of_each_model_and_method(model, method, extra):
    m = train(TrainConfig(method=method, model=model, **TINY, **extra), data=tiny_images(), **QUIET)
    assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 <= m["valid_accuracy"] <= 1.0
    assert m["model"] == model and m["method"] == method and m["config"]["width"] == 0.125
    depth = {"cnn": 6, "resnet18": 8, "mobilenetv3": 11}[model]
    assert len(m["layers"]) == (1 if method == "bp" else depth)
    for rec in m["layers"]:
        assert "margin" in rec and len(rec["train_loss"]) == 1
        assert all(v is not None and math.isfinite(v) for v in rec["train_loss"] + rec["valid_loss"])
    json.dumps(m)
    if method == "sff":
        assert m["head"]["kind"].startswith("per-class" if extra.get("ff_predict", "goodness") == "goodness" else "linear")


def test_olu_with_one_step_per_epoch_records_the_untrained_blocks_as_null():
    m = train(TrainConfig(method="symba", model="cnn", olu=True, **dict(TINY, batch_size=64)), data=tiny_images(), **QUIET)
    assert [rec["train_loss"][0] is None for rec in m["layers"]] == [True, False] * 3  # step 0: odd blocks only


def test_sff_learns_the_tiny_task():
    m = train(TrainConfig(method="sff", model="cnn", **dict(TINY, epochs=4)), data=tiny_images(n_train=128), **QUIET)
    assert m["test_accuracy"] > 0.6 and m["head"]["kind"].startswith("per-class")  # chance is 0.25


@pytest.mark.parametrize("kw,match", [
    (dict(method="sff", model="mlp"), "conv model"), (dict(model="mlp", width=0.5), "width must be an int"),
    (dict(model="resnet18", norm="layer"), "norm"), (dict(model="cnn", layers=7), "6 blocks"),
    (dict(method="bp", model="cnn", olu=True), "olu"), (dict(model="cnn", width=0.0), "width must be > 0"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).resolved()


def test_block_channels_match_the_models_and_sffa_needs_even_ones():
    from ffkern.train.conv_models import block_channels
    from ffkern.train.trainer import check_compatible

    for kind, depth in (("cnn", 6), ("cnn", 12), ("resnet18", None), ("mobilenetv3", None)):
        enc = build_conv_encoder(kind, (1, 8, 8), 4, width=0.3, depth=depth)
        assert block_channels(kind, 0.3, depth) == enc.block_channels
    with pytest.raises(ValueError, match="odd number of channels"):
        check_compatible(TrainConfig(method="sffa", model="cnn", width=0.3).resolved(), tiny_images())
    with pytest.raises(ValueError, match="image inputs"):
        vectors = Dataset("vec", torch.randn(8, 5), torch.arange(8) % 2, torch.randn(4, 5), torch.arange(4) % 2,
                          torch.randn(4, 5), torch.arange(4) % 2, 2)
        check_compatible(TrainConfig(method="symba", model="cnn").resolved(), vectors)


def test_pipeline_refuses_olu_takes_conv_models():
    with pytest.raises(ValueError, match="olu"):
        check_pipeline(TrainConfig(method="symba", model="mlp", olu=True).resolved(), 2)
    check_pipeline(TrainConfig(method="symba", model="cnn").resolved(), 2)  # tests/test_pipeline.py: equal runs


def test_cli_float_width_and_olu(tmp_path, capsys):
    from ffkern.cli import main

    d = tiny_images(n_train=64, n_eval=16, channels=1)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=d.x_train.numpy(), y_train=d.y_train.numpy(), x_test=d.x_test.numpy(), y_test=d.y_test.numpy())
    out = tmp_path / "m.json"
    rc = main(["train", "--dataset", str(path), "--model", "cnn", "--method", "symba", "--olu", "--width", "0.125",
               "--epochs", "1", "--batch-size", "32", "--backend", "reference", "--no-progress", "--metrics-out", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["config"]["olu"] is True and m["config"]["width"] == 0.125 and len(m["layers"]) == 6
    capsys.readouterr()
    assert main(["train", "--dataset", str(path), "--model", "mlp", "--width", "0.5", "--no-progress"]) == 2
    assert "width must be an int >= 1, got 0.5" in capsys.readouterr().err


def test_sff_prediction_averages_the_chosen_blocks_and_names_its_backend(monkeypatch):
    from ffkern.train import trainer
    from ffkern.train.heads import class_goodness_logits
    from ffkern.train.methods import make_objective

    enc = build_conv_encoder("cnn", (1, 8, 8), 4, width=0.0625, depth=6)
    objectives = [make_objective("sff", enc, None, layer=l, backend="reference") for l in range(6)]
    x = torch.randn(3, 1, 8, 8)
    per_block, h = [], enc.prepare(x)
    with torch.no_grad():
        for layer, obj in zip(enc.layers, objectives):
            h = layer.eval()(h)
            per_block.append(obj.logits(h))
    per_block = torch.stack(per_block)
    assert torch.allclose(class_goodness_logits(enc, objectives, x), per_block.mean(0), atol=1e-6)
    assert torch.allclose(class_goodness_logits(enc, objectives, x, layers=[5]), per_block[5], atol=1e-6)
    assert torch.allclose(class_goodness_logits(enc, objectives, x, layers=[1, 3]), per_block[[1, 3]].mean(0), atol=1e-6)

    class Fused:
        name = "cpp"

    monkeypatch.setattr("ffkern.per_class._impl", lambda backend, device: Fused())  # what per_class would run
    assert trainer.per_class_backend("auto", "cpu") == "cpp"  # reported, not assumed


def test_progress_names_the_layers_and_shows_no_placeholders(monkeypatch):
    from ffkern.train import trainer
    from ffkern.train.metrics import History

    history = History(["layer 0", "layer 1", "layer 2"])
    history.layers[0]["train_loss"] = [0.9, None]  # OLU: trained in epoch 0, not in epoch 1: its last value
    history.layers[1]["train_loss"] = [0.5123, 0.4981]
    history.layers[2]["train_loss"] = [None, None]  # never trained yet: left out
    assert trainer.loss_postfix(history) == "L0 0.900 L1 0.498"
    assert trainer.loss_postfix(history, first_layer=4) == "L4 0.900 L5 0.498"  # a pipeline stage's layers

    shown = []

    class Bar:  # what the run shows on its tqdm bar, epoch by epoch
        def __init__(self, epochs, desc, enabled, start=0):
            self.epochs = range(start, epochs)

        def __iter__(self):
            return iter(self.epochs)

        def set_postfix(self, *args, **kwargs):
            raise AssertionError("the postfix is one text, not key=value pairs")

        def set_postfix_str(self, text, refresh=True):
            shown.append(text)

    monkeypatch.setattr(trainer, "_progress", Bar)
    train(TrainConfig(method="symba", model="cnn", olu=True, **dict(TINY, batch_size=64, epochs=2)), data=tiny_images(),
          **QUIET)
    assert len(shown) == 2 and all("-" not in text for text in shown)
    assert [part for part in shown[-1].split() if part.startswith("L")] == ["L1", "L3", "L5"]  # step 0: odd blocks only
