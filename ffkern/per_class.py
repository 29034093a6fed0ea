"""Per-class goodness loss for convolutional layers (SPEC 2.2; the Scalable-FF idea, Krutsylo 2025).

A 1x1 convolution with K output channels (one per class) reads a block's output h [B, C, H, W];
the goodness of class k is the spatial mean of squares of channel k; the loss is the softmax
cross-entropy of ``scale`` times those K goodness values against the label. One forward pass,
no label in the input: the true class is the positive, the other K - 1 classes the negatives.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ._backend import BackendUnavailable, check_backend_name, resolve
from ._checks import REDUCTIONS, check_choice, check_float_tensor


def _impl(backend: str, device: torch.device):
    """The backend object that computes the loss. "auto" picks the backend the other losses use
    on that device (fused kernels: "triton" on CUDA, "cpp" on CPU, where they run), and the
    reference for a backend without the kernel (the attribute ``per_class_loss``); a backend named
    explicitly must have it, else BackendUnavailable says so, so that asking for a fast path never
    silently runs the slow one."""
    check_backend_name(backend)
    impl = resolve(backend, device)  # raises BackendUnavailable if a named backend cannot run here at all
    if hasattr(impl, "per_class_loss"):
        return impl
    if backend == "auto":
        return resolve("reference", device)
    raise BackendUnavailable(f"backend {backend!r} has no per-class goodness kernel yet; use backend='auto' or"
                             f" 'reference' (the reference implementation)")


def _check(h, weight, bias, labels=None):
    check_float_tensor("h", h)
    check_float_tensor("weight", weight)
    if h.dim() != 4:
        raise ValueError(f"h must be a feature map [B, C, H, W], got shape {list(h.shape)}")
    if weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1) or weight.dim() not in (2, 4):
        raise ValueError(f"weight must be [K, C] or a 1x1 conv weight [K, C, 1, 1], got shape {list(weight.shape)}")
    k, c = weight.shape[0], weight.shape[1]
    if c != h.shape[1]:
        raise ValueError(f"weight has {c} input channels but h has C={h.shape[1]}")
    if k < 2:
        raise ValueError(f"the per-class loss needs K >= 2 classes (output channels of weight), got {k}")
    if weight.device != h.device:
        raise ValueError(f"weight is on {weight.device} but h on {h.device}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (k,):
            raise ValueError(f"bias must have shape [K] = [{k}], got {list(bias.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
            raise TypeError("labels must be an int32/int64 tensor [B]")
        if tuple(labels.shape) != (h.shape[0],):
            raise ValueError(f"labels must have shape [B] = [{h.shape[0]}], got {list(labels.shape)}")
        # the range check reads the values (a host sync), which torch.compile cannot trace: there it
        # is skipped, and the fused kernels give a NaN loss for a label outside [0, K)
        if labels.numel() and not torch.compiler.is_compiling() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"labels must lie in [0, K) = [0, {k}), got values in [{int(labels.min())}, {int(labels.max())}]")


def _check_scale(scale):
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a one-element tensor, got shape {list(scale.shape)}")
        return scale.reshape(())
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def class_goodness(h: torch.Tensor, weight: torch.Tensor, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """Class goodness ``[B, K]``: g_bk = mean over positions of (1x1 conv of h with weight, + bias)_k^2.

    h: [B, C, H, W], contiguous or channels-last; weight: [K, C] or [K, C, 1, 1]. Backends as
    for per_class_goodness_loss."""
    _check(h, weight, bias)
    return _impl(backend, h.device).class_goodness(h, weight, bias)


def per_class_goodness_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias=None,
                            scale=1.0, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """SPEC 2.2: L_b = logsumexp_k(s g_bk) - s g_b,y_b with g = class_goodness(h, weight, bias),
    s = ``scale`` (a number, or a one-element tensor such as a learned temperature, which gets a
    gradient); reduction "mean" (default), "sum" or "none" ([B]).

    Differentiable in h, weight, bias and a tensor scale. Computed in float32 (float64 stays
    float64), also inside autocast. Backends: "triton" and "cpp" have fused kernels (the class maps z
    [B, K, H, W] are never stored); backend="auto" picks them as for the other losses (triton on
    CUDA, cpp on CPU), else the reference. The fused backends implement first-order reverse mode
    (loss.backward(), torch.autograd.grad); double backward, forward-mode AD and torch.func.grad
    raise and name the reference, which supports every mode."""
    _check(h, weight, bias, labels)
    check_choice("reduction", reduction, REDUCTIONS)
    return _impl(backend, h.device).per_class_loss(h, weight, labels, bias, _check_scale(scale), reduction)


class PerClassGoodnessLoss(nn.Module):
    """The per-class head of one block: its own 1x1 conv ``proj`` (C -> K, initialized as
    nn.Conv2d is) and scale, trained with the block. ``criterion(h, labels)`` is the loss;
    ``criterion.logits(h)`` the scaled class goodness [B, K] that prediction averages over blocks.

    learnable_scale=True learns log(scale) (the scale stays positive), starting from ``scale``."""

    def __init__(self, in_channels: int, num_classes: int, *, scale: float = 1.0, learnable_scale: bool = False,
                 bias: bool = False, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        _check_scale(scale)
        check_choice("reduction", reduction, REDUCTIONS)
        check_backend_name(backend)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.proj = nn.Conv2d(in_channels, num_classes, 1, bias=bias)
        log_scale = torch.tensor(math.log(scale))
        if learnable_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.reduction, self.backend = reduction, backend

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def goodness(self, h: torch.Tensor) -> torch.Tensor:
        return class_goodness(h, self.proj.weight, self.proj.bias, backend=self.backend)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.goodness(h)

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_class_goodness_loss(h, self.proj.weight, labels, bias=self.proj.bias, scale=self.scale,
                                       reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        learned = isinstance(self.log_scale, nn.Parameter)
        return f"scale={'learned' if learned else format(float(self.scale), 'g')}"


# ---- shared by the fused backends ("triton": kernels/per_class_goodness.py, "cpp": ffkern/cpp/per_class_ops.py)
# Both define the operators class_goodness(h, weight, bias) -> g [B, K], per_class_loss(h, weight,
# labels, bias, scale, reduction) -> (loss, g) and per_class_backward(h, weight, bias, dL/dg) ->
# (dh, dW, dbias) in their namespace; the loss's coefficients over [B, K] are computed here.


def map_strides(h: torch.Tensor):
    """(stride_b, stride_c, stride_p) of h [B, C, H, W] whose H*W positions p are one stride apart
    (contiguous NCHW: stride_p = 1; channels-last: stride_p = C), or None where they are not."""
    _, _, height, width = h.shape
    if width == 1:
        stride_p = h.stride(2)
    elif height == 1 or h.stride(2) == width * h.stride(3):
        stride_p = h.stride(3)
    else:
        return None
    return h.stride(0), h.stride(1), stride_p


def grad_like(h: torch.Tensor) -> torch.Tensor:
    """dL/dh in h's dtype and layout: channels-last for a channels-last h, else contiguous."""
    channels_last = not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(h, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def kernel_scale(scale, h: torch.Tensor) -> torch.Tensor:
    """The scale as the 0-dim tensor the operators take (a tensor scale keeps its gradient); a
    number is filled on h's device (no host-to-device copy)."""
    if isinstance(scale, torch.Tensor):
        return scale.reshape(())
    return torch.full((), float(scale), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32,
                      device=h.device)


def reduce_losses(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def loss_coefficients(g, labels, scale, grad_loss, reduction):
    """SPEC 2.2's gradient of the reduced loss with respect to g [B, K] and to the scale, from g
    (the forward's only saved statistic): with p = softmax(s g_b) and the incoming gradient c_b,
    dL/dg_bk = c_b s (p_bk - [k = y_b]), dL/ds = sum_b c_b sum_k g_bk (p_bk - [k = y_b])."""
    batch = g.shape[0]
    if grad_loss is None:
        c = g.new_zeros(batch)
    else:
        c = grad_loss.to(g.dtype)
        c = c if reduction == "none" else c.reshape(()).expand(batch) / (batch if reduction == "mean" else 1)
    s = scale.detach().to(g.dtype)
    diff = torch.softmax(s * g, 1) - nn.functional.one_hot(labels.long(), g.shape[1]).to(g.dtype)
    weighted = c[:, None] * diff
    return s * weighted, (g * weighted).sum()


_FUNCTIONS = {"class_goodness": "class_goodness", "per_class_loss": "per_class_goodness_loss",
              "per_class_backward": "per_class_goodness_loss / class_goodness"}


def _refuse_modes(backend: str, namespace: str, name: str, args) -> None:
    """The refusals of ffkern._op_autograd.refuse_unsupported_modes, naming the per-class functions."""
    import torch.autograd.forward_ad as fwAD

    function = _FUNCTIONS[name]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(f"ffkern: backend '{backend}' does not support forward-mode AD (torch.func.jvp, "
                           f"torch.func.jacfwd, torch.autograd.forward_ad) of {function} (operator {namespace}::{name});"
                           f" use backend='reference' (plain PyTorch, supports every mode)")
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() if hasattr(functorch, "get_interpreter_stack") else None
    if stack and any(t.requires_grad for t in tensors) and any(i.key() == functorch.TransformType.Grad for i in stack):
        raise RuntimeError(f"ffkern: backend '{backend}' does not support torch.func.grad/vjp/jacrev/hessian of "
                           f"{function} (operator {namespace}::{name}); use torch.autograd.grad or loss.backward(), "
                           f"or use backend='reference' (plain PyTorch, supports every mode)")


def _double_backward(backend: str, namespace: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"ffkern: backend '{backend}' does not support double backward (create_graph=True) of "
                           f"{ctx.function} (its gradient is computed by operator {namespace}::per_class_backward, "
                           f"which has no derivative); use backend='reference'")
    return backward


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-row statistics and of dW / dbias: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_fakes(namespace: str) -> None:
    """Fake implementations (output shapes and dtypes only, for torch.compile) of a backend's
    {namespace}::class_goodness, per_class_loss and per_class_backward; both fused backends get
    the weight as [K, C]. Registered as from the calling module (_stacklevel=2), which the cpp
    schemas name in m.set_python_module."""

    def class_goodness_fake(h, weight, bias):
        return h.new_empty((h.shape[0], weight.shape[0]), dtype=stat_dtype(h.dtype))

    def per_class_loss_fake(h, weight, labels, bias, scale, reduction):
        st = stat_dtype(h.dtype)
        loss = h.new_empty((h.shape[0],) if reduction == "none" else (), dtype=st)
        return loss, h.new_empty((h.shape[0], weight.shape[0]), dtype=st)

    def per_class_backward_fake(h, weight, bias, coef):
        st = stat_dtype(h.dtype)
        return grad_like(h), h.new_empty((weight.shape[0], weight.shape[1]), dtype=st), h.new_empty((weight.shape[0],), dtype=st)

    for name, fake in (("class_goodness", class_goodness_fake), ("per_class_loss", per_class_loss_fake),
                       ("per_class_backward", per_class_backward_fake)):
        torch.library.register_fake(f"{namespace}::{name}", fake, _stacklevel=2)


class PerClassAutograd:
    """Autograd of one fused backend's per-class operators: first-order reverse mode; double
    backward, forward mode and torch.func.grad raise naming ffkern, the backend and the function
    (as ffkern._op_autograd does for the other operators)."""

    def __init__(self, backend: str, namespace: str, ops):
        self.backend, self.namespace, self.ops = backend, namespace, ops
        self._lib = torch.library.Library(namespace, "FRAGMENT")  # kept alive: it owns the kernels

    def _register(self, name, backward, setup_context):
        qualname = f"{self.namespace}::{name}"
        try:
            from torch._library.autograd import Info, make_autograd_impl
        except ImportError:  # a torch without that internal: plain registration, modes not refused
            torch.library.register_autograd(qualname, backward, setup_context=setup_context)
            return
        kernel = make_autograd_impl(getattr(self.ops, name).default, Info(backward, setup_context))
        backend, namespace = self.backend, self.namespace

        def checked_kernel(keyset, *args, **kwargs):
            _refuse_modes(backend, namespace, name, args)
            return kernel(keyset, *args, **kwargs)

        self._lib.impl(name, checked_kernel, "Autograd", with_keyset=True)

    def register_all(self):
        ops = self.ops

        def backward_setup(ctx, inputs, output):
            ctx.function = "per_class_goodness_loss or class_goodness"

        self._register("per_class_backward", _double_backward(self.backend, self.namespace), backward_setup)

        def goodness_setup(ctx, inputs, output):
            h, weight, bias = inputs
            ctx.save_for_backward(h, weight, bias)

        def goodness_grad(ctx, grad):
            h, weight, bias = ctx.saved_tensors
            dh, dw, db = ops.per_class_backward(h, weight, bias, grad)
            return dh, dw.to(weight.dtype), None if bias is None else db.to(bias.dtype)

        self._register("class_goodness", goodness_grad, goodness_setup)

        def loss_setup(ctx, inputs, output):
            h, weight, labels, bias, scale, reduction = inputs
            ctx.save_for_backward(h, weight, labels, bias, scale, output[1])
            ctx.reduction = reduction

        def loss_grad(ctx, grad_loss, grad_g):
            h, weight, labels, bias, scale, g = ctx.saved_tensors
            dg, dscale = loss_coefficients(g, labels, scale, grad_loss, ctx.reduction)
            if grad_g is not None:
                dg = dg + grad_g.to(dg.dtype)
            dh, dw, db = ops.per_class_backward(h, weight, bias, dg)
            return (dh, dw.to(weight.dtype), None, None if bias is None else db.to(bias.dtype),
                    dscale.to(scale.dtype).reshape(scale.shape), None)

        self._register("per_class_loss", loss_grad, loss_setup)
