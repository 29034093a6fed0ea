"""The marginal SupCon loss over a global batch spread across the ranks of a torch.distributed group.

Each rank holds its own samples (batch sizes may differ). Its loss is over its own anchors
contrasted against every row of every rank, and backward gives each rank the gradient of the SUM
over ranks of their losses with respect to its own features: the contract of an all-gather with
gradient, which is what DDP's gradient averaging expects.

Communication is only:
  forward:  one all-gather of a few scalars per rank (sizes, and the settings that must agree),
            one of the rows' features (operand dtype) and one of their labels;
  backward: one all-gather of three floats per row: lse_i, a_i, b_i (SPEC 1.3).
The gradient of row k needs, for every pair (k, j), G_kj + G_jk, and G_jk depends on row j only
through lse_j, a_j and b_j. So with those gathered, each rank computes dL/dz of its own rows by one
call of the backend primitive supcon_backward (local rows vs all rows) and no gradient-sized
reduce-scatter is needed. Every backend that implements the primitives works here.

Because backward is collective, every rank of the group must call backward on its loss.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._checks import FLOAT_DTYPES
from ._supcon_function import backward_coefficients

# Fields of the per-rank metadata row exchanged before any feature moves.
_ROWS, _BATCH, _SIMCLR, _DIM, _DTYPE, _TAU, _MARGIN = range(7)


def check_group(group, device: torch.device):
    """Raises a clear error unless ``group`` is a usable process group for tensors on ``device``."""
    if not dist.is_available():
        raise RuntimeError("group: torch.distributed is not available in this PyTorch build")
    if isinstance(group, int) and not isinstance(group, bool) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("group: this process is not a member of the given process group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            "group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD or one from"
            f" torch.distributed.new_group), or None for a single process; got {type(group).__name__}"
        )
    if not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialized; call torch.distributed.init_process_group first")
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the given process group")
    try:
        group._get_backend(device)
    except RuntimeError as err:
        raise ValueError(
            f"features are on {device}, which the group's backend ({dist.get_backend(group)}) does not support"
            " (gloo: cpu and cuda tensors; nccl: cuda tensors only)"
        ) from err


def _gather_rows(t: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """All-gathers ``t`` [sizes[rank], ...] from every rank, concatenated in rank order.

    Ranks may hold different numbers of rows: every rank pads to the largest, since the
    all-gather of every backend needs equal shapes, and the padding is sliced off again.
    """
    longest = max(sizes)
    t = t.contiguous()
    if t.shape[0] < longest:
        t = torch.cat([t, t.new_zeros((longest - t.shape[0],) + tuple(t.shape[1:]))])
    parts: List[torch.Tensor] = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _exchange_meta(rows: int, batch: int, simclr: bool, dim: int, operand_dtype, temperature, margin, device, group):
    """All-gathers each rank's sizes and settings ([world, 7] float64, exact for sizes < 2**53)
    and checks that the settings every rank's statistics depend on agree. Every rank sees the same
    table, so on a mismatch every rank raises the same error (none waits forever in a collective)."""
    mine = torch.tensor(
        [rows, batch, float(simclr), dim, FLOAT_DTYPES.index(operand_dtype), temperature, margin],
        dtype=torch.float64, device=device,
    )
    table = _gather_rows(mine[None], [1] * dist.get_world_size(group), group).cpu()
    first = table[0]
    for field, name in ((_DIM, "feature dimension D"), (_DTYPE, "features dtype"), (_TAU, "temperature"),
                        (_MARGIN, "margin"), (_SIMCLR, "labels=None (SimCLR) vs given labels")):
        if not bool((table[:, field] == first[field]).all()):
            values = table[:, field].tolist()
            if field == _DTYPE:
                values = [str(FLOAT_DTYPES[int(v)]) for v in values]
            raise ValueError(f"group: the ranks disagree on the {name}: {values} (rank order); it must be the same on all ranks")
    return table


class GlobalSupConRows(torch.autograd.Function):
    """(local z [n, D], local labels [n]) -> per-anchor loss L [n] of the local anchors against all
    rows of the group; |P(i)| and clipped counts as non-differentiable outputs.

    Saves the gathered rows (O(N_global * D)) and the local rows' statistics, nothing N x N."""

    @staticmethod
    def forward(ctx, z, labels, sizes, rank, temperature, margin, impl, operand_dtype, group):
        zo = z.to(operand_dtype).contiguous()
        z_all = _gather_rows(zo, sizes, group)
        y_all = _gather_rows(labels, sizes, group)
        offset = sum(sizes[:rank])  # global index of this rank's first row
        loss, lse, num_pos, num_clipped = impl.supcon_forward(zo, labels, z_all, y_all, offset, temperature, margin)
        ctx.save_for_backward(zo, labels, z_all, y_all, lse, num_pos)
        ctx.sizes, ctx.offset, ctx.group = sizes, offset, group
        ctx.temperature, ctx.margin, ctx.impl, ctx.z_dtype = temperature, margin, impl, z.dtype
        ctx.mark_non_differentiable(num_pos, num_clipped)
        return loss, num_pos, num_clipped

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_pos, _grad_clipped):
        zo, labels, z_all, y_all, lse, num_pos = ctx.saved_tensors
        # grad_loss is this rank's dLoss_r/dL_i; the other ranks' share of the objective
        # sum_r Loss_r reaches our rows through their (lse, a, b), gathered here: 3 floats a row.
        a, b = backward_coefficients(grad_loss.to(lse.dtype), num_pos, ctx.temperature)
        stats = _gather_rows(torch.stack([lse, a, b], 1), ctx.sizes, ctx.group)
        lse_c, a_c, b_c = (stats[:, k].contiguous() for k in range(3))
        dz = ctx.impl.supcon_backward(zo, labels, z_all, y_all, ctx.offset, lse, a, b, lse_c, a_c, b_c,
                                      ctx.temperature, ctx.margin)
        return dz.to(ctx.z_dtype), None, None, None, None, None, None, None, None


def global_supcon_rows(z, row_labels, *, batch: int, simclr: bool, temperature: float, margin: float, impl,
                       operand_dtype, group):
    """Per-anchor losses of this rank's rows ``z`` [n, D] (view-major, normalized) against the
    whole global batch of ``group``. Returns (L [n], |P(i)| [n], clipped [n]) like supcon_rows.

    ``row_labels`` are the local row labels; with ``simclr`` they are local sample indices
    0..batch-1, made globally unique here by adding the batch sizes of the earlier ranks, so
    positives stay views of the same sample.
    """
    check_group(group, z.device)
    rank = dist.get_rank(group)
    table = _exchange_meta(z.shape[0], batch, simclr, z.shape[1], operand_dtype, temperature, margin, z.device, group)
    sizes = [int(v) for v in table[:, _ROWS].tolist()]
    if simclr:
        row_labels = row_labels + int(table[:rank, _BATCH].sum().item())
    return GlobalSupConRows.apply(z, row_labels.contiguous(), sizes, rank, temperature, margin, impl, operand_dtype, group)
