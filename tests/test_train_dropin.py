"""Drop-in for existing CFF code: a training loop in the style of the CFF reference code
(criterion([x1.mean(1), x2.mean(1)], targets) per layer) gives the same per-layer losses with a
plain PyTorch SupMCon loss and with ``ffkern.MarginalSupConLoss(temperature=0.15, margin=m)``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ffkern
from ffkern.train.layerwise import make_local_layers, run_layers
from ffkern.train.methods import LayerBatch, make_objective
from ffkern.train.models import build_encoder
from ffkern.train.schedules import margin_schedule

L, STEPS, B = 3, 4, 32


class PlainSupMCon(nn.Module):
    """Marginal supervised contrastive loss written out in plain PyTorch, as existing CFF code has
    it: the margin is added to positive similarities and clipped at 1; mean over all anchors."""

    def __init__(self, temperature, margin):
        super().__init__()
        self.temperature, self.margin = temperature, margin

    def forward(self, features, labels):
        z = F.normalize(torch.cat(features, 0), dim=1)
        y = labels.repeat(len(features))
        eye = torch.eye(len(y), dtype=torch.bool)
        pos = (y[:, None] == y[None, :]) & ~eye
        sim = z @ z.T
        sim = torch.where(pos, torch.clamp(sim + self.margin, max=1.0), sim)
        logits = (sim / self.temperature).masked_fill(eye, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        mean_pos = log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1).clamp(min=1)
        return -mean_pos.mean()


def _model():
    enc = build_encoder("vit", (1, 8, 8), 10, width=32, depth=L, heads=4, patch_size=2, seed=0)
    return enc


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, B, 1, 8, 8, generator=g)
    views = (x + 0.2 * torch.randn(x.shape, generator=g), x + 0.2 * torch.randn(x.shape, generator=g))
    return views, torch.randint(0, 10, (STEPS, B), generator=g)


def cff_style_loop(model, criterions, one_forward=False):
    """The per-batch loop of the CFF reference code, unchanged but for the criterion objects."""
    optimizers = [torch.optim.AdamW(layer.parameters(), lr=1e-3) for layer in model.layers]
    (v1, v2), targets_all = _data()
    losses = [[] for _ in range(L)]
    for t in range(STEPS):
        x1, x2, targets = model.prepare(v1[t]), model.prepare(v2[t]), targets_all[t]
        for l in range(L):
            if one_forward:
                x1 = model.layers[l](x1.detach())
                loss = criterions[l]([x1.mean(1)], targets)
            else:
                x1 = model.layers[l](x1.detach())
                x2 = model.layers[l](x2.detach())
                loss = criterions[l]([x1.mean(1), x2.mean(1)], targets)
            optimizers[l].zero_grad()
            loss.backward()
            optimizers[l].step()
            losses[l].append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize("one_forward", [False, True])
def test_same_per_layer_losses_as_plain_pytorch(one_forward):
    margins = margin_schedule("linear", L)
    torch.manual_seed(0)
    plain = cff_style_loop(_model(), [PlainSupMCon(0.15, m) for m in margins], one_forward)
    torch.manual_seed(0)
    fused = cff_style_loop(_model(), [ffkern.MarginalSupConLoss(temperature=0.15, margin=m) for m in margins], one_forward)
    assert plain.shape == (L, STEPS) and torch.isfinite(plain).all()
    assert not torch.allclose(plain[:, 0], plain[:, -1])  # the layers did learn something
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_ffkern_trainer_matches_the_two_forward_loop():
    """ffkern.train runs both views as one concatenated batch per layer: same losses as two forwards."""
    margins = margin_schedule("linear", L)
    plain = cff_style_loop(_model(), [PlainSupMCon(0.15, m) for m in margins])
    enc = _model()
    layers = make_local_layers(list(enc.layers), [make_objective("cff", enc, m) for m in margins], lr=1e-3)
    (v1, v2), targets = _data()
    ours = [[] for _ in range(L)]
    for t in range(STEPS):
        batch = LayerBatch(enc.prepare(torch.cat([v1[t], v2[t]], 0)), targets[t], 2)
        _, stats = run_layers(layers, batch)
        for l, st in enumerate(stats):
            ours[l].append(float(st.loss))
    torch.testing.assert_close(torch.tensor(ours), plain, rtol=1e-4, atol=1e-5)


def test_plain_loss_is_the_spec_on_a_hand_example():
    # two samples of one class, one of another; orthogonal unit vectors except one pair
    f1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    a = PlainSupMCon(0.5, 0.3)([f1], y)
    b = ffkern.marginal_supcon_loss([f1], y, temperature=0.5, margin=0.3, backend="reference")
    torch.testing.assert_close(a, b)
