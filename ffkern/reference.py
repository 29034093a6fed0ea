"""The reference backend: plain PyTorch, written to read like SPEC.md. It is the executable spec
that every other backend is tested against. It builds the N x N similarity matrix, so it needs
O(N^2) memory; the other backends do not.

All arithmetic runs in float32 (float64 inputs stay float64).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """[N, 1] powers of two 2^-e (in x's compute dtype, no gradient) that bring the rows whose
    squared norm could overflow (max |x_ij| >= 2^((emax - 32) / 2): 2^48 in float32, bfloat16 and
    float16's compute dtype, 2^496 in float64) down to max |x_ij| in [1, 2); 1 for every other row.

    z = x / ||x|| is scale invariant, and a power of two scales exactly, so z (and the gradient,
    times the same factor) is what exact arithmetic gives: a finite row of norm 1e30 is a unit
    vector, not the zero vector that x / inf would make it. A row holding inf gets NaN (inf * 0),
    as inf / inf would; a NaN stays NaN."""
    dt = compute_dtype(x.dtype)
    big = 2.0 ** 496 if dt == torch.float64 else 2.0 ** 48  # (emax - 32) / 2, emax = 1024 or 128
    with torch.no_grad():
        amax = x.detach().abs().amax(dim=1, keepdim=True).to(dt)
        exponent = torch.where(amax >= big, torch.floor(torch.log2(amax)), torch.zeros_like(amax))
        return torch.exp2(-exponent)


def normalize_rows(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """SPEC 1.2 step 1 in the compute dtype: z_i = x_i / max(||x_i||_2, 1e-12) (or x as it is),
    without overflow for huge rows (row_scale)."""
    z = x.to(compute_dtype(x.dtype))
    return F.normalize(z * row_scale(z), dim=1, eps=1e-12) if normalize else z


def supcon_rows(z: torch.Tensor, labels: torch.Tensor, temperature: float, margin: float):
    """Per-anchor marginal SupCon loss L_i (SPEC 1.2, steps 2-5) on rows z [N, D].

    Returns (L [N], |P(i)| [N] int32, clipped positives [N] int32).
    """
    z = z.to(compute_dtype(z.dtype))
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pos = (labels[:, None] == labels[None, :]) & ~eye  # M_ij
    s = z @ z.T  # s_ij
    t = torch.where(pos, torch.clamp(s + margin, max=1.0), s)  # t_ij: margin on positives, clipped at 1
    logits = (t / temperature).masked_fill(eye, float("-inf"))  # l_ij, self-pair excluded
    num_pos = pos.sum(1)
    clipped = (pos & (s + margin >= 1.0)).sum(1)  # SPEC 1.4
    if n == 1:  # no pair exists: L = 0 (and logsumexp over nothing would give NaN gradients)
        return (z.sum() * 0.0).expand(1), num_pos.int(), clipped.int()
    lse = torch.logsumexp(logits, dim=1)
    pos_mean = logits.masked_fill(~pos, 0.0).sum(1) / num_pos.clamp(min=1)
    loss = torch.where(num_pos > 0, lse - pos_mean, torch.zeros_like(lse))
    return loss, num_pos.int(), clipped.int()


def supcon_forward(zr, yr, zc, yc, row_offset: int, temperature: float, margin: float):
    """Forward statistics of anchors ``zr`` (global rows row_offset ..) against all rows ``zc``.

    The primitive that the fused backends implement without the N x N matrix; here it is written
    out with it. Returns (L [n], lse [n], |P(i)| [n] int32, clipped [n] int32); no autograd.
    """
    with torch.no_grad():
        dt = compute_dtype(zr.dtype)
        s = zr.to(dt) @ zc.to(dt).T
        n, n_all = s.shape
        self_pair = torch.arange(n, device=s.device)[:, None] + row_offset == torch.arange(n_all, device=s.device)[None, :]
        pos = (yr[:, None] == yc[None, :]) & ~self_pair
        logits = torch.where(pos, torch.clamp(s + margin, max=1.0), s) / temperature
        logits = logits.masked_fill(self_pair, float("-inf"))
        lse = torch.logsumexp(logits, dim=1)
        num_pos = pos.sum(1)
        pos_mean = logits.masked_fill(~pos, 0.0).sum(1) / num_pos.clamp(min=1)
        loss = torch.where(num_pos > 0, lse - pos_mean, torch.zeros_like(lse))
        clipped = (pos & (s + margin >= 1.0)).sum(1)
        return loss, lse, num_pos.int(), clipped.int()


def supcon_backward(zr, yr, zc, yc, row_offset, lse_r, a_r, b_r, lse_c, a_c, b_c, temperature, margin):
    """dL/dz for the anchors ``zr`` by the symmetric pair term of SPEC 1.3:

        dz_k = sum_{j != k} (G_kj + G_jk) z_j,   G_ij = kappa_ij (a_i p_ij - b_i M_ij),
        a_i = g_i w_i / tau,  b_i = a_i / |P(i)|,  p_ij = exp(l_ij - lse_i).

    ``*_r`` are the statistics of the anchors, ``*_c`` those of all rows (the same tensors when
    anchors are all rows). Written out with N x N matrices; the fused backends sweep tiles instead.
    """
    with torch.no_grad():
        dt = compute_dtype(zr.dtype)
        zr, zc = zr.to(dt), zc.to(dt)
        s = zr @ zc.T
        n, n_all = s.shape
        self_pair = torch.arange(n, device=s.device)[:, None] + row_offset == torch.arange(n_all, device=s.device)[None, :]
        pos = (yr[:, None] == yc[None, :]) & ~self_pair
        logits = torch.where(pos, torch.clamp(s + margin, max=1.0), s) / temperature
        kappa = ~(pos & (s + margin > 1.0)) & ~self_pair  # clipped positives pass no gradient
        p_kj = torch.exp(logits - lse_r[:, None])
        p_jk = torch.exp(logits - lse_c[None, :])
        g_sym = a_r[:, None] * p_kj + a_c[None, :] * p_jk - (b_r[:, None] + b_c[None, :]) * pos
        g_sym = torch.where(kappa, g_sym, torch.zeros_like(g_sym))
        return g_sym @ zc


def goodness(h: torch.Tensor, kind: str = "mean", skip_tokens: int = 0) -> torch.Tensor:
    """g(h) of SPEC 2: mean (or sum) over features of the squared token-mean activation."""
    h = h.to(compute_dtype(h.dtype))
    if h.dim() == 3:
        h = h[:, skip_tokens:, :].mean(1)
    sq = h.square()
    return sq.mean(-1) if kind == "mean" else sq.sum(-1)


def ff_loss(h_pos, h_neg, threshold: float, kind: str = "mean", skip_tokens: int = 0):
    """Hinton (2022): mean over the 2B values of softplus(theta - g+) and softplus(g- - theta)."""
    g_pos, g_neg = goodness(h_pos, kind, skip_tokens), goodness(h_neg, kind, skip_tokens)
    return torch.cat([F.softplus(threshold - g_pos), F.softplus(g_neg - threshold)]).mean()


def symba_loss(h_pos, h_neg, alpha: float, kind: str = "mean", skip_tokens: int = 0):
    """SymBa (Lee & Song 2023): mean_b softplus(-alpha (g+_b - g-_b))."""
    g_pos, g_neg = goodness(h_pos, kind, skip_tokens), goodness(h_neg, kind, skip_tokens)
    return F.softplus(-alpha * (g_pos - g_neg)).mean()


SFFA_EPS = 1e-4


def sffa_q(h: torch.Tensor, skip_tokens: int = 0) -> torch.Tensor:
    """q = mean(h_P^2) / (mean(h_P^2) + mean(h_N^2)), P the first half of the units, N the second,
    clamped to [1e-4, 1 - 1e-4]. An all-zero sample (both energies 0, e.g. every ReLU unit off)
    gets q = 1/2 and no gradient, where the ratio would be 0/0 (SPEC 2 leaves it undefined).
    NaN in, NaN out: a NaN or inf activation makes q, and so the loss, NaN."""
    h = h.to(compute_dtype(h.dtype))
    if h.dim() == 3:
        h = h[:, skip_tokens:, :].mean(1)
    half = h.shape[-1] // 2
    m_p = h[:, :half].square().mean(-1)
    m_n = h[:, half:].square().mean(-1)
    total = m_p + m_n
    alive = total != 0  # a NaN or inf activation gives q = NaN (inf / inf), never a "dead" sample
    q = torch.where(alive, m_p / torch.where(alive, total, torch.ones_like(total)), torch.full_like(total, 0.5))
    return torch.clamp(q, SFFA_EPS, 1.0 - SFFA_EPS)


SFFA_ACTIVITY_RATE = 10.0  # the constant of the authors' activity term (SPEC 2)


def sffa_activity(h_pos, h_neg, skip_tokens: int = 0) -> torch.Tensor:
    """A = 1 + exp(-10 (mean(h+) + mean(h-))), the means over every entry that enters the loss
    (all B*D values, or B*(T - skip)*D for tokens: the mean of the token means). Differentiated,
    not detached, as in the SFFA authors' code (SPEC 2)."""
    def mean(h):
        h = h.to(compute_dtype(h.dtype))
        return (h[:, skip_tokens:, :] if h.dim() == 3 else h).mean()

    return 1.0 + torch.exp(-SFFA_ACTIVITY_RATE * (mean(h_pos) + mean(h_neg)))


def sffa_loss(h_pos, h_neg, kind: str = "mean", skip_tokens: int = 0, activity_term: bool = False):
    """SFFA (Terres-Escudero et al. 2024): -mean over the 2B values of log q(h+) and log(1 - q(h-)),
    times sffa_activity(h_pos, h_neg) when ``activity_term`` (the authors' code, SPEC 2).

    ``kind`` does not change q (both halves have D/2 units); it is accepted for a uniform signature.
    """
    q_pos, q_neg = sffa_q(h_pos, skip_tokens), sffa_q(h_neg, skip_tokens)
    loss = -torch.cat([q_pos.log(), (1.0 - q_neg).log()]).mean()
    return loss * sffa_activity(h_pos, h_neg, skip_tokens) if activity_term else loss


# ---------------------------------------------------------------- per-class goodness (SPEC 2.2)
def class_goodness(h: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """g [B, K]: z = the 1x1 convolution of h [B, C, H, W] with weight [K, C] (+ bias [K]);
    g_bk = mean over the H*W positions of z_bk^2."""
    dt = compute_dtype(h.dtype)
    w = weight.reshape(weight.shape[0], -1).to(dt)
    z = torch.einsum("bchw,kc->bkhw", h.to(dt), w)
    if bias is not None:
        z = z + bias.to(dt)[None, :, None, None]
    return z.square().mean((2, 3))


def per_class_loss(h, weight, labels, bias=None, scale=1.0, reduction: str = "mean"):
    """Softmax cross-entropy of the logits scale * g [B, K] against the labels (SPEC 2.2):
    L_b = logsumexp_k(scale g_bk) - scale g_b,y_b."""
    logits = scale * class_goodness(h, weight, bias)
    loss = torch.logsumexp(logits, 1) - logits.gather(1, labels.long()[:, None])[:, 0]
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


PAIR_LOSSES = {"ff": ff_loss, "symba": symba_loss, "sffa": sffa_loss}


def _no_autocast(fn):
    """The reference computes in float32 (float64 for float64) as SPEC 1-2 say, also inside a
    user's torch.autocast region: there z @ z.T would otherwise run in bf16/fp16 and the loss
    would come back in that dtype. Inputs an autocast region produced in bf16 are upcast by
    compute_dtype as any bf16 input is."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)} or {"cpu"}
        with contextlib.ExitStack() as stack:
            for device in devices:
                if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device_type=device, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


class ReferenceBackend:
    name = "reference"

    def unavailable_reason(self, device: torch.device):
        return None  # runs everywhere

    @_no_autocast
    def supcon_rows(self, x, labels, temperature, margin, normalize):
        return supcon_rows(normalize_rows(x, normalize), labels, temperature, margin)

    supcon_forward = staticmethod(_no_autocast(supcon_forward))
    supcon_backward = staticmethod(_no_autocast(supcon_backward))

    @_no_autocast
    def goodness(self, h, kind, skip_tokens):
        return goodness(h, kind, skip_tokens)

    @_no_autocast
    def pair_loss(self, loss, h_pos, h_neg, param, kind, skip_tokens, activity_term=False):
        if loss == "sffa":
            return sffa_loss(h_pos, h_neg, kind, skip_tokens, activity_term)
        return PAIR_LOSSES[loss](h_pos, h_neg, param, kind, skip_tokens)

    class_goodness = staticmethod(_no_autocast(class_goodness))
    per_class_loss = staticmethod(_no_autocast(per_class_loss))
