"""The layer-local update rule (SPEC 3): a layer's update depends only on its input batch.

Consequences tested here: no gradient reaches an earlier layer; the output handed on is the one
computed before the layer's step; training a layer alone on recorded inputs, or running the layers
as a pipeline (layer l on batch t while layer l+1 runs batch t-1), gives bit-identical weights to
sequential training; the per-batch randomness does not depend on which layer runs first.
"""
import copy

import pytest
import torch

from ffkern.train import rng
from ffkern.train.data import Augment
from ffkern.train.layerwise import make_local_layers, run_layers, train_layer_step
from ffkern.train.methods import LayerBatch, first_batch, make_objective
from ffkern.train.models import build_encoder

B, STEPS = 24, 4


def _setup(method="cff", model="mlp", seed=0):
    kw = dict(width=16, depth=3, heads=2, patch_size=2)
    enc = build_encoder(model, (1, 4, 4), 3, label_input=method != "cff", label_scale=2.0, seed=seed, **kw)
    objectives = [make_objective(method, enc, m, backend="reference") for m in (0.4, 0.25, 0.1)]
    return enc, make_local_layers(list(enc.layers), objectives, lr=1e-2)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS, B, 1, 4, 4, generator=g), torch.randint(0, 3, (STEPS, B), generator=g)


def _input(method, enc, xs, ys, t):
    return first_batch(method, enc, xs[t], ys[t], augment=Augment(1, 0.1), num_views=2, seed=7, epoch=0, step=t)


def _params(layer):
    return [p.detach().clone() for p in layer.module.parameters()]


def test_no_gradient_reaches_earlier_layers():
    enc, layers = _setup()
    xs, ys = _data()
    batch = _input("cff", enc, xs, ys, 0)
    h0 = layers[0].module(batch.h)  # NOT detached by the caller: the layer must cut the graph itself
    assert h0.requires_grad
    train_layer_step(layers[1], LayerBatch(h0, batch.labels, batch.groups))
    assert all(p.grad is None for p in layers[0].module.parameters())
    assert all(p.grad is not None for p in layers[1].module.parameters())


def test_output_is_computed_before_the_step_and_detached():
    enc, layers = _setup()
    xs, ys = _data()
    batch = _input("cff", enc, xs, ys, 0)
    before = copy.deepcopy(layers[0].module)
    out, stats = train_layer_step(layers[0], batch)
    assert not out.h.requires_grad and out.labels is batch.labels and out.groups == 2
    assert torch.equal(out.h, before(batch.h))  # pre-step weights produced what is handed on
    assert not torch.equal(out.h, layers[0].module(batch.h))  # and the step did change the layer
    assert stats.samples == B and torch.isfinite(stats.loss) and 0.0 <= float(stats.clipped_fraction) <= 1.0


@pytest.mark.parametrize("method,model", [("cff", "mlp"), ("cff", "vit"), ("symba", "mlp"), ("ff", "vit")])
def test_layer_alone_on_recorded_inputs_matches_sequential(method, model):
    enc, layers = _setup(method, model)
    xs, ys = _data()
    recorded = []
    for t in range(STEPS):
        batch = _input(method, enc, xs, ys, t)
        batch, _ = run_layers(layers[:2], batch)
        recorded.append(batch)
        run_layers(layers[2:], batch)
    _, fresh = _setup(method, model)  # same seed: same initial weights, fresh optimizers
    for batch in recorded:
        train_layer_step(fresh[2], batch)
    for a, b in zip(_params(layers[2]), _params(fresh[2])):
        assert torch.equal(a, b)


def test_pipeline_schedule_matches_sequential():
    xs, ys = _data()
    enc, seq = _setup()
    for t in range(STEPS):
        run_layers(seq, _input("cff", enc, xs, ys, t))
    # Pipeline: at tick k, layer l runs batch k - l; the last layer goes first within a tick, as
    # parallel stages would not wait for each other. Inputs are rebuilt from the seeded streams.
    enc2, pipe = _setup()
    inbox = {0: {t: _input("cff", enc2, xs, ys, t) for t in reversed(range(STEPS))}}
    for tick in range(STEPS + len(pipe) - 1):
        for l in reversed(range(len(pipe))):
            t = tick - l
            if 0 <= t < STEPS:
                out, _ = train_layer_step(pipe[l], inbox[l].pop(t))
                inbox.setdefault(l + 1, {})[t] = out
    for a, b in zip(seq, pipe):
        for p, q in zip(_params(a), _params(b)):
            assert torch.equal(p, q)


def test_batch_randomness_depends_only_on_its_key():
    enc, _ = _setup("ff")
    xs, ys = _data()
    a = [_input("ff", enc, xs, ys, t) for t in range(STEPS)]
    torch.manual_seed(123)  # global RNG state must not matter
    b = [_input("ff", enc, xs, ys, t) for t in reversed(range(STEPS))][::-1]
    for u, v in zip(a, b):
        assert torch.equal(u.h, v.h)
    assert not torch.equal(a[0].h, a[1].h)


def test_layers_built_alone_get_the_same_weights():
    full = build_encoder("mlp", (1, 4, 4), 3, width=16, depth=3, seed=4)
    assert torch.equal(full.layers[2][0].weight, build_encoder("mlp", (1, 4, 4), 3, width=16, depth=3, seed=4).layers[2][0].weight)
    with rng.seeded(4, rng.INIT, 1):  # the stream of layer 1 rebuilds layer 1
        alone = torch.nn.Linear(16, 16)
    assert torch.equal(alone.weight, full.layers[1][0].weight)


def test_make_local_layers_checks_lengths():
    enc, _ = _setup()
    with pytest.raises(ValueError, match="objectives"):
        make_local_layers(list(enc.layers), [None], lr=1e-3)
