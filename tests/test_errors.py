"""Bad input raises ValueError/TypeError naming the argument, before any kernel runs; backend
selection errors say why."""
import pytest
import torch

import ffkern
from ffkern import _backend

X = torch.randn(4, 2, 8)
Y = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("call,exc,message", [
    (lambda b: ffkern.marginal_supcon_loss(torch.randn(2, 3, 4, 5), Y, backend=b), ValueError, "got a 4-D tensor"),
    (lambda b: ffkern.marginal_supcon_loss(torch.randn(8), Y, backend=b), ValueError, "got a 1-D tensor"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y[:3], backend=b), ValueError, "labels has length 3, expected 4"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y.float(), backend=b), TypeError, "labels must have an integer dtype"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y.bool(), backend=b), TypeError, "labels must have an integer dtype"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y[:, None], backend=b), ValueError, "labels must be 1-D"),
    (lambda b: ffkern.marginal_supcon_loss(X, [0, 1, 0, 1], backend=b), TypeError, "labels must be a torch.Tensor"),
    (lambda b: ffkern.marginal_supcon_loss([torch.randn(4, 8), torch.randn(5, 8)], Y, backend=b), ValueError, "same shape"),
    (lambda b: ffkern.marginal_supcon_loss([torch.randn(4, 8), torch.randn(4, 8).double()], Y, backend=b), TypeError, "dtype"),
    (lambda b: ffkern.marginal_supcon_loss([torch.randn(4, 2, 8)], Y, backend=b), ValueError, "features[0] must be 2-D"),
    (lambda b: ffkern.marginal_supcon_loss([], Y, backend=b), ValueError, "list of views is empty"),
    (lambda b: ffkern.marginal_supcon_loss(torch.randn(0, 2, 8), Y[:0], backend=b), ValueError, "empty batch"),
    (lambda b: ffkern.marginal_supcon_loss(torch.randn(0, 8), Y[:0], backend=b), ValueError, "empty batch"),
    (lambda b: ffkern.marginal_supcon_loss(torch.randn(4, 2, 0), Y, backend=b), ValueError, "dimension D is 0"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y, temperature=0.0, backend=b), ValueError, "temperature must be > 0"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y, temperature=-1, backend=b), ValueError, "temperature must be > 0"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y, temperature="0.1", backend=b), TypeError, "temperature must be a real number"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y, temperature=float("nan"), backend=b), ValueError, "temperature must be finite"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y, margin=-0.1, backend=b), ValueError, "margin must be >= 0"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y, margin=2.5, backend=b), ValueError, "margin must be <= 2"),
    (lambda b: ffkern.marginal_supcon_loss(X.long(), Y, backend=b), TypeError, "features must be a floating-point tensor"),
    (lambda b: ffkern.marginal_supcon_loss(X.numpy(), Y, backend=b), TypeError, "features must be a torch.Tensor"),
    (lambda b: ffkern.marginal_supcon_loss(torch.randn(8, 5), None, backend=b), ValueError, "labels is required for flat"),
    (lambda b: ffkern.marginal_supcon_loss([torch.randn(4, 5)], None, backend=b), ValueError, "needs at least 2 views"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y.to("meta"), backend=b), ValueError, "labels is on meta but features is on cpu"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y, reduction="avg", backend=b), ValueError, "reduction must be one of"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y, normalize=1, backend=b), TypeError, "normalize must be a bool"),
    (lambda b: ffkern.marginal_supcon_loss(X, Y, base_temperature=0, backend=b), ValueError, "base_temperature must be > 0"),
    (lambda b: ffkern.ff_goodness(torch.randn(4), backend=b), ValueError, "h must be [B, D] or [B, T, D]"),
    (lambda b: ffkern.ff_goodness(torch.randn(4, 3).int(), backend=b), TypeError, "h must be a floating-point tensor"),
    (lambda b: ffkern.ff_goodness(torch.randn(4, 3), kind="max", backend=b), ValueError, "kind must be one of"),
    (lambda b: ffkern.ff_goodness(torch.randn(4, 3), skip_tokens=1, backend=b), ValueError, "skip_tokens=1 needs token activations"),
    (lambda b: ffkern.ff_goodness(torch.randn(4, 2, 3), skip_tokens=2, backend=b), ValueError, "leaves no tokens"),
    (lambda b: ffkern.ff_goodness(torch.randn(4, 2, 3), skip_tokens=-1, backend=b), ValueError, "skip_tokens must be >= 0"),
    (lambda b: ffkern.ff_goodness(torch.randn(0, 3), backend=b), ValueError, "h: empty batch"),
    (lambda b: ffkern.ff_loss(torch.randn(4, 6), torch.randn(5, 6), backend=b), ValueError, "h_pos and h_neg must have the same shape"),
    (lambda b: ffkern.ff_loss(torch.randn(4, 6), torch.randn(4, 6).double(), backend=b), TypeError, "same dtype"),
    (lambda b: ffkern.ff_loss(torch.randn(4, 6), "x", backend=b), TypeError, "h_neg must be a torch.Tensor"),
    (lambda b: ffkern.ff_loss(torch.randn(4, 6), torch.randn(4, 6), threshold=None, backend=b), TypeError, "threshold must be a real number"),
    (lambda b: ffkern.symba_loss(torch.randn(4, 6), torch.randn(4, 6), alpha=0, backend=b), ValueError, "alpha must be > 0"),
    (lambda b: ffkern.sffa_loss(torch.randn(4, 5), torch.randn(4, 5), backend=b), ValueError, "D must be even"),
    (lambda b: ffkern.sffa_loss(torch.randn(4, 6), torch.randn(4, 6).to("meta"), backend=b), ValueError, "h_pos is on cpu but h_neg is on meta"),
])
def test_bad_input(call, exc, message, backend):
    with pytest.raises(exc) as info:
        call(backend)
    assert message in str(info.value)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \[.*'reference'.*\], got 'fast'"):
        ffkern.marginal_supcon_loss(X, Y, backend="fast")
    with pytest.raises(TypeError, match="backend must be a string"):
        ffkern.ff_loss(X[:, 0], X[:, 1], backend=None)


def test_env_override(monkeypatch):
    monkeypatch.setenv("FFKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FFKERN_BACKEND must be 'auto' or one of"):
        ffkern.marginal_supcon_loss(X, Y)
    monkeypatch.setenv("FFKERN_BACKEND", "reference")
    assert _backend.resolve("auto", torch.device("cpu")).name == "reference"
    # an explicitly named backend is not overridden
    assert _backend.resolve("reference", torch.device("cpu")).name == "reference"


@pytest.mark.skipif(not _backend.triton_importable(), reason="triton is not installed")
def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(_backend.BackendUnavailable, match="TRITON_INTERPRET=1"):
        ffkern.marginal_supcon_loss(X, Y, backend="triton")
    with pytest.raises(_backend.BackendUnavailable, match="need CUDA tensors"):
        ffkern.ff_loss(X[:, 0], X[:, 1], backend="triton")
    # "auto" never picks Triton for CPU tensors without the interpreter
    assert _backend.resolve("auto", torch.device("cpu")).name != "triton"


def test_auto_on_cpu_is_not_the_interpreter():
    """The interpreter is for tests: "auto" never chooses it for speed."""
    assert _backend.resolve("auto", torch.device("cpu")).name != "triton"


# ---- the nn.Module wrappers check their options at construction -------------------------------------

@pytest.mark.parametrize("make,exc,message", [
    (lambda: ffkern.MarginalSupConLoss(temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda: ffkern.MarginalSupConLoss(margin=-0.1), ValueError, "margin must be >= 0"),
    (lambda: ffkern.MarginalSupConLoss(margin=2.5), ValueError, "margin must be <= 2"),
    (lambda: ffkern.MarginalSupConLoss(reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: ffkern.MarginalSupConLoss(normalize=1), TypeError, "normalize must be a bool"),
    (lambda: ffkern.MarginalSupConLoss(base_temperature=-1.0), ValueError, "base_temperature must be > 0"),
    (lambda: ffkern.MarginalSupConLoss(backend="tritn"), ValueError, "backend must be 'auto' or one of"),
    (lambda: ffkern.MarginalSupConLoss(backend=None), TypeError, "backend must be a string"),
    (lambda: ffkern.MarginalSupConLoss(return_stats="yes"), TypeError, "return_stats must be a bool"),
    (lambda: ffkern.MarginalSupConLoss(group="world"), TypeError, "group must be a torch.distributed.ProcessGroup"),
    (lambda: ffkern.FFLoss(threshold=float("nan")), ValueError, "threshold must be finite"),
    (lambda: ffkern.FFLoss(kind="max"), ValueError, "kind must be one of"),
    (lambda: ffkern.SymBaLoss(alpha=0.0), ValueError, "alpha must be > 0"),
    (lambda: ffkern.SymBaLoss(skip_tokens=-1), ValueError, "skip_tokens must be >= 0"),
    (lambda: ffkern.SFFALoss(skip_tokens=1.5), TypeError, "skip_tokens must be an int"),
    (lambda: ffkern.SFFALoss(backend="cuda"), ValueError, "backend must be 'auto' or one of"),
])
def test_module_options_checked_at_construction(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


def test_module_takes_return_stats_and_group_like_the_function():
    criterion = ffkern.MarginalSupConLoss(temperature=0.2, margin=0.3, return_stats=True, group=None,
                                          backend="reference")
    loss, stats = criterion(X, Y)
    expected, expected_stats = ffkern.marginal_supcon_loss(X, Y, temperature=0.2, margin=0.3, return_stats=True,
                                                           backend="reference")
    assert torch.equal(loss, expected) and torch.equal(stats.num_clipped, expected_stats.num_clipped)
    # call-time keywords override the constructor's
    assert torch.equal(criterion(X, Y, return_stats=False), expected)
    h1, h2 = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(ffkern.FFLoss(threshold=1.0, backend="reference")(h1, h2, threshold=3.0),
                       ffkern.ff_loss(h1, h2, threshold=3.0, backend="reference"))
