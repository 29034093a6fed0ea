"""Per-layer linear probe and Fisher criterion (probe.py, SPEC 1.4), their History keys, the end
table and the plot panel."""
import json
import math

import numpy as np
import pytest
import torch

from ffkern.train.data import Dataset
from ffkern.train.metrics import CLIPPED_NOTE, PROBE_NOTE, History, format_table
from ffkern.train.models import build_encoder
from ffkern.train.probe import PROBE_KEYS, fisher_criterion, layer_fisher, probe_encoder, probe_layers


def scatter_fisher(f, y):
    """The textbook definition with the D x D scatter matrices (numpy, float64)."""
    f = np.asarray(f, dtype=np.float64)
    mu = f.mean(0)
    sw, sb = np.zeros((f.shape[1],) * 2), np.zeros((f.shape[1],) * 2)
    for c in np.unique(y):
        fc = f[y == c]
        mc = fc.mean(0)
        sw += (fc - mc).T @ (fc - mc)
        sb += len(fc) * np.outer(mc - mu, mc - mu)
    return np.trace(sb) / np.trace(sw)


def blobs(n=300, d=6, k=3, spread=0.5, seed=0, centers_seed=None):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(k, d, generator=torch.Generator().manual_seed(seed if centers_seed is None else centers_seed))
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + spread * torch.randn(n, d, generator=g), y


def test_fisher_matches_the_scatter_matrix_definition():
    f, y = blobs()
    got = fisher_criterion(f, y, normalize=False)
    assert got == pytest.approx(scatter_fisher(f.numpy(), y.numpy()), rel=1e-12)
    unit = f.double() / f.double().norm(dim=1, keepdim=True)
    assert fisher_criterion(f, y) == pytest.approx(scatter_fisher(unit.numpy(), y.numpy()), rel=1e-12)


def test_fisher_scale_behaviour_and_dtype():
    f, y = blobs(seed=1)
    f = f.double()  # exact products: the scalings below change nothing but the lengths
    rows = torch.rand(f.shape[0], 1, dtype=torch.float64) * 10 + 0.1
    # normalized (default): per-row lengths do not matter; raw: only a common scale does not
    assert fisher_criterion(f * rows, y) == pytest.approx(fisher_criterion(f, y), rel=1e-10)
    assert fisher_criterion(7.0 * f, y, normalize=False) == pytest.approx(fisher_criterion(f, y, normalize=False), rel=1e-10)
    assert fisher_criterion(f * rows, y, normalize=False) != pytest.approx(fisher_criterion(f, y, normalize=False), rel=1e-3)
    # computed in float64 whatever the input dtype
    assert fisher_criterion(f.half(), y) == fisher_criterion(f.half().double(), y)
    # better separated classes score higher
    tight, _ = blobs(spread=0.1, seed=1)
    assert fisher_criterion(tight, y) > fisher_criterion(f, y)
    assert fisher_criterion(f.float(), y) == pytest.approx(fisher_criterion(f, y), rel=1e-5)


def test_fisher_degenerate_cases():
    f, y = blobs(n=20)
    assert math.isnan(fisher_criterion(f, torch.zeros(20, dtype=torch.long)))  # one class
    pts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert fisher_criterion(pts, torch.tensor([0, 0, 1, 1])) == math.inf  # no within-class spread
    assert math.isnan(fisher_criterion(torch.ones(4, 2), torch.tensor([0, 0, 1, 1])))  # no spread at all
    with pytest.raises(ValueError, match="features"):
        fisher_criterion(f[0], y[:1])
    with pytest.raises(ValueError, match="labels"):
        fisher_criterion(f, y[:5])
    with pytest.raises(TypeError, match="labels"):
        fisher_criterion(f, y.float())
    with pytest.raises(TypeError, match="features"):
        fisher_criterion(f.long(), y)


def test_fisher_has_no_n_by_n_matrix():
    # 200k rows: an N x N float64 matrix would need 320 GB
    f, y = blobs(n=200_000, d=4, k=5, seed=2)
    assert math.isfinite(fisher_criterion(f, y))


def _layers(seed=0):
    """Two 'layers' of features: the second separates the classes, the first is noise."""
    feats, ys = [], []
    for s in range(3):  # train, valid, test
        f, y = blobs(n=200, k=3, spread=0.3, seed=10 * seed + s, centers_seed=seed)
        noise = torch.randn(f.shape, generator=torch.Generator().manual_seed(99 + s))
        feats.append([noise, f])
        ys.append(y)
    return feats, ys


def test_probe_layers_accuracy_fisher_and_determinism():
    (tr, va, te), (ytr, yva, yte) = _layers()
    out = probe_layers(tr, ytr, va, yva, te, yte, 3, epochs=5, batch_size=32, seed=3)
    assert len(out) == 2 and all(set(r) == set(PROBE_KEYS) for r in out)
    assert out[1]["probe_test_accuracy"] > 0.95 and out[0]["probe_test_accuracy"] < 0.6
    assert out[1]["probe_valid_fisher"] > 10 * out[0]["probe_valid_fisher"]
    assert out[1]["probe_test_fisher"] == pytest.approx(fisher_criterion(te[1], yte))
    assert probe_layers(tr, ytr, va, yva, te, yte, 3, epochs=5, batch_size=32, seed=3) == out
    with pytest.raises(ValueError, match="epochs"):
        probe_layers(tr, ytr, va, yva, te, yte, 3, epochs=0)
    with pytest.raises(ValueError, match="same number"):
        probe_layers(tr, ytr, va[:1], yva, te, yte, 3)
    with pytest.raises(ValueError, match=r"valid_feats\[1\]"):
        probe_layers(tr, ytr, [va[0], va[1][:5]], yva, te, yte, 3)


def _tiny_data():
    g = torch.Generator().manual_seed(0)

    def part(n):
        y = torch.randint(0, 4, (n,), generator=g)
        x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
        x[torch.arange(n), 0, 2 * y] += 2.0
        return x, y

    (xt, yt), (xv, yv), (xs, ys) = part(80), part(40), part(40)
    return Dataset("tiny", xt, yt, xv, yv, xs, ys, 4)


@pytest.mark.parametrize("kind,label_input", [("mlp", False), ("mlp", True), ("vit", True)])
def test_probe_encoder_and_layer_fisher_on_an_encoder(kind, label_input):
    data = _tiny_data()
    enc = build_encoder(kind, (1, 8, 8), 4, width=16, depth=2, heads=2, patch_size=4, label_input=label_input)
    fisher = layer_fisher(enc, data.x_valid, data.y_valid)
    out = probe_encoder(enc, data, epochs=2)
    assert len(fisher) == len(out) == 2
    assert [r["probe_valid_fisher"] for r in out] == pytest.approx(fisher)
    assert all(0.0 <= r["probe_test_accuracy"] <= 1.0 for r in out)


def _history(margins=None, clipped=None):
    h = History(["layer 0", "layer 1"], margins)
    for l in range(2):
        h.layers[l].update(train_loss=[1.0, 0.5], valid_loss=[1.1, 0.6], train_clipped_fraction=[clipped, clipped],
                           valid_clipped_fraction=[clipped, clipped], valid_fisher=[None, None])
    return h


def test_history_records_fisher_per_epoch_and_the_probe():
    from ffkern.train.layerwise import StepStats

    h = History(["layer 0", "layer 1"])
    for epoch in range(2):
        for l in range(2):
            h.add("train", l, StepStats(torch.tensor(1.0), None, 4))
        if epoch == 1:
            h.add_fisher([2.0, 3.5])
        h.end_epoch()
    assert h.layers[1]["valid_fisher"] == [None, 3.5]
    h.set_probe([{"probe_test_accuracy": 0.5, "probe_test_fisher": 1.0}, {"probe_test_accuracy": 0.75, "probe_test_fisher": 2.0}])
    recs = json.loads(json.dumps(h.to_json()))
    assert recs[1]["probe_test_accuracy"] == 0.75 and recs[1]["valid_fisher"] == [None, 3.5]
    assert "train_loss" in recs[0] and "margin" in recs[0]  # the existing keys stay
    back = History.from_json(recs)
    assert back.to_json() == recs
    # a metrics file from before these keys existed still reads
    old = [{k: v for k, v in r.items() if k != "valid_fisher" and not k.startswith("probe_")} for r in recs]
    assert History.from_json(old).layers[0]["valid_fisher"] == [None, None]
    with pytest.raises(ValueError, match="one value per layer"):
        h.add_fisher([1.0])
    with pytest.raises(ValueError, match="one result per layer"):
        h.set_probe([{}])


def test_table_has_no_dash_rows_and_only_the_method_s_columns():
    ff = format_table(_history())
    lines = ff.splitlines()
    assert not any(set(line.replace(" ", "")) <= {"-"} for line in lines)
    assert "margin" not in lines[0] and "clipped" not in ff and len(lines) == 3
    cff = format_table(_history(margins=[0.4, 0.1], clipped=0.25))
    assert "margin" in cff.splitlines()[0] and "valid clipped" in cff and CLIPPED_NOTE in cff
    assert "s + m >= 1" in CLIPPED_NOTE and "no gradient" in CLIPPED_NOTE
    probed = _history()
    probed.set_probe([{"probe_valid_accuracy": 0.5, "probe_test_accuracy": 0.4, "probe_valid_fisher": 1.25,
                       "probe_test_fisher": 1.5}] * 2)
    text = format_table(probed)
    assert "probe test" in text and "40.0%" in text and "1.25" in text and PROBE_NOTE in text
    per_epoch_only = _history()
    per_epoch_only.layers[0]["valid_fisher"] = [1.0, 2.0]
    assert "Fisher valid" in format_table(per_epoch_only) and "Fisher test" not in format_table(per_epoch_only)


def test_plot_has_the_per_layer_and_fisher_panels(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    import matplotlib.figure

    from ffkern.train.metrics import plot_history

    h = _history(margins=[0.4, 0.1], clipped=0.2)
    h.layers[0]["valid_fisher"] = [1.0, 2.0]
    h.set_probe([{"probe_valid_accuracy": 0.5, "probe_test_accuracy": 0.4, "probe_valid_fisher": 1.0,
                  "probe_test_fisher": 1.5}] * 2)
    seen = {}
    real = matplotlib.figure.Figure.savefig

    def spy(self, *args, **kwargs):
        seen["titles"] = [ax.get_title() for ax in self.axes]
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    path = tmp_path / "p.png"
    plot_history(str(path), h)
    assert path.read_bytes()[:4] == b"\x89PNG"
    titles = seen["titles"]
    assert "per-layer loss" in titles and "Fisher criterion, validation features" in titles
    assert "per layer at the end" in titles and any("clipped" in t for t in titles)
    plot_history(str(path), _history())  # no clipped, Fisher or probe: the loss panel only
    assert seen["titles"] == ["per-layer loss"]
