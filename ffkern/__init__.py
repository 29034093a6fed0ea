"""ffkern: fused loss kernels for Forward-Forward style, layer-local training.

Losses: marginal supervised contrastive loss of Contrastive Forward-Forward (SPEC 1) and the FF
goodness losses (SPEC 2). Backends: "reference" (plain PyTorch, the executable spec), "triton"
(fused kernels, O(N*D) memory). Importing ffkern imports no backend; each loads on first use.
"""
from ._backend import BACKENDS, BackendUnavailable
from .feature_maps import channel_tokens, flat_features
from .ff_losses import ff_goodness, ff_loss, sffa_loss, symba_loss
from .marginal_supcon import SupConStats, marginal_supcon_loss
from .nn import FFLoss, MarginalSupConLoss, SFFALoss, SymBaLoss
from .per_class import PerClassGoodnessLoss, class_goodness, per_class_goodness_loss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailable", "FFLoss", "MarginalSupConLoss", "SFFALoss", "SupConStats",
    "SymBaLoss", "ff_goodness", "ff_loss", "marginal_supcon_loss", "sffa_loss", "symba_loss",
    "PerClassGoodnessLoss", "channel_tokens", "class_goodness", "flat_features", "per_class_goodness_loss",
]
