"""Feature maps [B, C, H, W] into the goodness losses as views (no copy), with the reference's values."""
import pytest
import torch

import ffkern
from ffkern import channel_tokens, flat_features


def maps(seed=0, b=6, c=8, h=3, w=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype).relu()
    return x, x.contiguous(memory_format=torch.channels_last)


def test_views_share_memory():
    nchw, nhwc = maps()
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    for x in (nchw, nhwc):
        for view in (flat_features(x), channel_tokens(x)):
            assert view.data_ptr() == x.data_ptr()  # a view, not a copy
    assert flat_features(nchw).shape == (6, 8 * 15) and flat_features(nchw).is_contiguous()
    assert flat_features(nhwc).is_contiguous()  # [B, H, W, C] memory order
    assert channel_tokens(nchw).shape == (6, 15, 8) and channel_tokens(nhwc).is_contiguous()
    # The channel tokens hold the channels as features in both layouts.
    assert torch.equal(channel_tokens(nchw), channel_tokens(nhwc))
    assert torch.equal(channel_tokens(nchw)[:, 4, 2], nchw[:, 2, 0, 4])


def test_other_strides_are_copied_and_shapes_checked():
    x = torch.randn(4, 3, 6, 6)[:, :, ::2, ::2]  # neither layout
    assert torch.equal(flat_features(x), x.reshape(4, -1))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        flat_features(torch.randn(4, 3))


@pytest.mark.parametrize("layout", [0, 1], ids=["nchw", "channels_last"])
def test_goodness_losses_on_maps_match_the_formulas(layout):
    """The Trifecta's goodness (mean of squares over C, H, W) and FF / SymBa of it; SFFA with the
    halves by channels (energies of the spatially averaged channels), in either layout."""
    pos, neg = maps(1)[layout], maps(2)[layout]
    g_pos, g_neg = pos.double().square().mean((1, 2, 3)), neg.double().square().mean((1, 2, 3))
    ref = dict(backend="reference")
    assert torch.allclose(ffkern.ff_goodness(flat_features(pos), **ref).double(), g_pos, rtol=1e-6)
    symba = torch.nn.functional.softplus(-4.0 * (g_pos - g_neg)).mean()
    assert torch.allclose(ffkern.symba_loss(flat_features(pos), flat_features(neg), **ref).double(), symba, rtol=1e-6)
    ff = torch.cat([torch.nn.functional.softplus(2.0 - g_pos), torch.nn.functional.softplus(g_neg - 2.0)]).mean()
    assert torch.allclose(ffkern.ff_loss(flat_features(pos), flat_features(neg), **ref).double(), ff, rtol=1e-6)

    def q(x):
        m = x.double().mean((2, 3)).square()  # [B, C]
        e_p, e_n = m[:, :4].mean(1), m[:, 4:].mean(1)
        return (e_p / (e_p + e_n)).clamp(1e-4, 1 - 1e-4)

    sffa = -torch.cat([q(pos).log(), (1 - q(neg)).log()]).mean()
    got = ffkern.sffa_loss(channel_tokens(pos), channel_tokens(neg), **ref).double()
    assert torch.allclose(got, sffa, rtol=1e-6)


def test_layouts_give_the_same_losses_and_gradients():
    (a, a_cl), (b, b_cl) = maps(3, dtype=torch.float64), maps(4, dtype=torch.float64)
    for loss, view in ((ffkern.symba_loss, flat_features), (ffkern.sffa_loss, channel_tokens)):
        grads = []
        for x, y in ((a, b), (a_cl, b_cl)):
            x = x.clone().requires_grad_(True) if x.is_contiguous() else \
                x.clone(memory_format=torch.channels_last).requires_grad_(True)
            out = loss(view(x), view(y), backend="reference")
            out.backward()
            grads.append((out.detach(), x.grad))
        assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-12)
        assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-14)


def test_gradcheck_through_the_views():
    pos, neg = maps(5, b=3, c=4, h=2, w=2, dtype=torch.float64)[1], maps(6, b=3, c=4, h=2, w=2, dtype=torch.float64)[1]
    pos, neg = pos.detach().requires_grad_(True), neg.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, n: ffkern.symba_loss(flat_features(p), flat_features(n), backend="reference"),
                                    (pos, neg))
    assert torch.autograd.gradcheck(lambda p, n: ffkern.sffa_loss(channel_tokens(p), channel_tokens(n), backend="reference"),
                                    (pos + 0.1, neg + 0.1))
