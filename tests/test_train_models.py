"""Encoder options from the seeds' own code: SFFA's top-k per half and its label patterns (MLP),
the L2 norm of the whole token output between the layers of an FF-family ViT (the CFF baseline)."""
import pytest
import torch

from ffkern.train.methods import GoodnessObjective, LayerBatch, first_batch
from ffkern.train.models import (SFFA_TOPK, TokenL2Norm, TopKHalves, build_encoder, default_label_encoding,
                                 default_sffa_topk)


def test_topk_halves_keeps_the_k_largest_of_each_half():
    h = torch.relu(torch.randn(5, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    out = TopKHalves(3, 40)(h)
    for half in (slice(0, 20), slice(20, 40)):
        expect = torch.zeros_like(h[:, half])
        vals, idx = h[:, half].topk(3, dim=1)
        expect.scatter_(1, idx, vals)
        assert torch.equal(out[:, half], expect)
    # tokens [B, T, D]: per token
    t = torch.rand(2, 4, 10)
    assert ((TopKHalves(2, 10)(t) != 0).sum(-1) == 4).all()


def test_topk_halves_gradient_reaches_the_kept_units_only():
    h = torch.rand(3, 12, dtype=torch.float64, requires_grad=True)
    layer = TopKHalves(2, 12)
    out = layer(h)
    out.pow(2).sum().backward()
    kept = out.detach() != 0
    assert torch.equal(h.grad != 0, kept) and torch.allclose(h.grad[kept], 2 * h.detach()[kept])
    torch.autograd.gradcheck(lambda x: layer(x), (torch.rand(2, 8, dtype=torch.float64, requires_grad=True),))


def test_topk_halves_errors():
    with pytest.raises(ValueError, match="sffa_topk"):
        TopKHalves(0, 10)
    with pytest.raises(ValueError, match="sffa_topk"):
        TopKHalves(6, 10)  # halves of 5
    with pytest.raises(ValueError, match="even"):
        TopKHalves(2, 9)


def test_sffa_mlp_layers_are_sparse_and_the_default():
    assert default_sffa_topk("sffa", "mlp") == SFFA_TOPK == 15
    assert all(default_sffa_topk(m, k) is None for m, k in (("sffa", "vit"), ("sffa", "cnn"), ("ff", "mlp"), ("cff", "mlp")))
    assert default_label_encoding("sffa", "mlp") == "pattern"
    assert all(default_label_encoding(m, k) == "onehot" for m, k in (("sffa", "vit"), ("ff", "mlp"), ("symba", "mlp")))
    enc = build_encoder("mlp", (1, 8, 8), 10, width=64, depth=3, label_input=True, sffa_topk=15)
    h = enc.embed_labels(enc.prepare(torch.randn(6, 1, 8, 8)), torch.arange(6))
    for layer in enc.layers:
        h = layer(h)
        assert ((h[:, :32] != 0).sum(1) <= 15).all() and ((h[:, 32:] != 0).sum(1) <= 15).all()
    # the weights do not change with the option (TopKHalves has none)
    plain = build_encoder("mlp", (1, 8, 8), 10, width=64, depth=3, label_input=True)
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), plain.state_dict().values()))
    for kind in ("vit", "cnn"):
        with pytest.raises(ValueError, match="sffa_topk"):
            build_encoder(kind, (1, 8, 8), 10, width=16 if kind == "vit" else 0.25, depth=2 if kind == "vit" else 6,
                          heads=2, patch_size=4, label_input=True, sffa_topk=15)


def test_label_patterns_appended_to_the_input():
    kw = dict(width=16, depth=2, label_input=True, label_scale=2.5, label_encoding="pattern")
    enc = build_encoder("mlp", (1, 8, 8), 10, seed=3, **kw)
    pats = enc.label_patterns
    assert pats.shape == (10, 100) and set(pats.unique().tolist()) <= {0.0, 1.0}
    assert 0.02 < pats.mean().item() < 0.25  # Bernoulli(0.1)
    assert torch.equal(build_encoder("mlp", (1, 8, 8), 10, seed=3, **kw).label_patterns, pats)  # fixed by the seed
    assert not torch.equal(build_encoder("mlp", (1, 8, 8), 10, seed=4, **kw).label_patterns, pats)
    x = enc.prepare(torch.randn(4, 1, 8, 8))
    y = torch.tensor([0, 3, 3, 9])
    inp = enc.embed_labels(x, y)
    assert inp.shape == (4, 164) and torch.equal(inp[:, :64], x) and torch.equal(inp[:, 64:], 2.5 * pats[y])
    assert torch.equal(enc.embed_labels(x, None)[:, 64:], torch.zeros(4, 100))
    assert enc.layers[0][1].in_features == 164 and enc(torch.randn(4, 1, 8, 8), y).shape == (4, 16)
    with pytest.raises(ValueError, match="label_encoding"):
        build_encoder("mlp", (1, 8, 8), 10, width=16, depth=2, label_encoding="bits")
    with pytest.raises(ValueError, match="label_encoding"):
        build_encoder("vit", (1, 8, 8), 10, width=16, depth=2, heads=2, patch_size=4, label_encoding="pattern")


def test_token_l2_norm():
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    out = TokenL2Norm()(x)
    assert torch.allclose(out.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(out, torch.nn.functional.normalize(x.flatten(1)).view_as(x))
    assert torch.equal(TokenL2Norm()(torch.zeros(2, 3, 4)), torch.zeros(2, 3, 4))


def _vit(label_input=True, normalize_between=None):
    return build_encoder("vit", (1, 8, 8), 4, width=16, depth=3, heads=2, patch_size=4, label_input=label_input,
                         normalize_between=normalize_between)


def test_ff_vit_normalizes_the_token_output_between_layers():
    enc, plain = _vit(), _vit(normalize_between=False)
    assert enc.normalize_between and not _vit(label_input=False).normalize_between  # on for the FF family only
    assert type(enc.layers[0]) is type(plain.layers[0]) and not isinstance(enc.layers[0], torch.nn.Sequential)
    assert all(isinstance(enc.layers[l][0], TokenL2Norm) for l in (1, 2))
    # same weights as without the norm (it has none), block for block
    for l in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(enc.layers[l][1].state_dict().values(), plain.layers[l].state_dict().values()))
    enc.eval()
    seen = []
    for l in (1, 2):
        enc.layers[l][1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(5, 1, 8, 8)
    h0 = enc.layers[0](enc.embed_labels(enc.prepare(x), torch.arange(5) % 4))
    h1 = enc.layers[1](h0)
    # the next block receives unit-length outputs (all tokens, label token included) ...
    assert torch.allclose(seen[0], h0 / h0.flatten(1).norm(dim=1)[:, None, None])
    assert torch.allclose(seen[0].flatten(1).norm(dim=1), torch.ones(5))
    # ... while the layer's output, which the goodness loss sees, is not normalized
    assert not torch.allclose(h1.flatten(1).norm(dim=1), torch.ones(5), atol=1e-2)
    assert torch.allclose(h1, plain.layers[1](h0 / h0.flatten(1).norm(dim=1)[:, None, None]), atol=1e-6)
    with pytest.raises(ValueError, match="normalize_between"):
        build_encoder("mlp", (1, 8, 8), 4, width=16, depth=2, normalize_between=True)


def test_ff_vit_goodness_is_on_the_raw_output():
    enc = _vit()
    batch = first_batch("ff", enc, torch.randn(6, 1, 8, 8), torch.arange(6) % 4, augment=None, num_views=1, seed=0,
                        epoch=0, step=0)
    out0 = enc.layers[0](batch.h)
    out1 = enc.layers[1](out0)
    obj = GoodnessObjective("ff", skip_tokens=enc.skip_tokens, backend="reference")
    loss, _ = obj(out1, LayerBatch(out0, batch.labels, 2))
    from ffkern import ff_loss

    pos, neg = out1.chunk(2)
    assert torch.allclose(loss, ff_loss(pos, neg, skip_tokens=1, backend="reference"))
