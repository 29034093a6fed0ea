"""The global-batch marginal SupCon loss on torch.distributed (ffkern.distributed) against the
single-process loss on the concatenated global batch.

Each world (2 and 3 gloo processes on the CPU, loopback only, unequal batch sizes) is started once:
this file run as a script is the worker; it evaluates every case and saves its losses, gradients
and stats, and the tests below compare them with the "reference" backend run in this process.
The contract checked: rank r's loss is over its own anchors against all rows (reduced over its
anchors), and its gradient is that of sum_r loss_r with respect to its own inputs.
"""
from __future__ import annotations

import datetime
import os
import sys
from typing import NamedTuple, Optional

import pytest
import torch

from ffkern import marginal_supcon_loss
from ffkern._backend import BACKENDS, BackendUnavailable, resolve
from spawn_world import spawn_world

WORLD_BATCHES = {2: (3, 5), 3: (2, 4, 3)}  # samples per rank: unequal on purpose
VIEWS, DIM, CLASSES = 2, 8, 3
FLAT_EXTRA = 2  # flat layout: rank r holds batches[r] + 2 rows
WORKER_TIMEOUT_S = 180


class Case(NamedTuple):
    layout: str  # "flat" [N, D], "bvd" [B, V, D], "list" V x [B, D]
    simclr: bool  # labels=None
    reduction: str
    margin: float
    base_temperature: Optional[float] = None

    @property
    def id(self) -> str:
        bt = f"-bt{self.base_temperature}" if self.base_temperature else ""
        return f"{self.layout}-{'simclr' if self.simclr else 'labels'}-{self.reduction}-m{self.margin}{bt}"


CASES = [
    Case(layout, simclr, reduction, margin)
    for layout, simclr in (("flat", False), ("bvd", False), ("bvd", True), ("list", False), ("list", True))
    for reduction in ("mean", "sum", "none")
    for margin in (0.0, 0.4)
] + [Case("bvd", False, "mean", 0.4, base_temperature=0.07)]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def backend_setup(name: str):
    """(device, dtype) a backend is tested on here, or a string saying why it is not."""
    if name == "reference":
        return torch.device("cpu"), torch.float64  # float64: agreement to ~1e-12, any slip shows
    if name == "triton" and not (torch.cuda.is_available() or _interpreting()):
        return "triton kernels need a CUDA device or TRITON_INTERPRET=1"
    device = torch.device("cuda" if torch.cuda.is_available() and not _interpreting() else "cpu")
    try:
        resolve(name, device)
    except BackendUnavailable as err:
        return str(err)
    return device, torch.float32


def tolerances(dtype):
    return dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------- the global batch of one case
class GlobalBatch(NamedTuple):
    x: torch.Tensor  # [B_total, V, D] (or [N_total, D] for flat), float64
    labels: torch.Tensor  # [B_total] (or [N_total])
    weights: torch.Tensor  # [N_total] view-major: d objective / d L_i, for reduction "none"
    batches: tuple  # per rank: samples (flat: rows)


def make_global(case: Case, world: int, case_index: int) -> GlobalBatch:
    gen = torch.Generator().manual_seed(1000 * world + case_index)
    batches = WORLD_BATCHES[world]
    if case.layout == "flat":
        batches = tuple(b + FLAT_EXTRA for b in batches)
    total = sum(batches)
    labels = torch.randint(0, CLASSES, (total,), generator=gen)
    centers = torch.randn(CLASSES, DIM, generator=gen, dtype=torch.float64)
    # Samples near their class center, views near their sample: some positives land above
    # 1 - 0.4 in similarity (clipped by the margin) and some below, so both gradient cases occur.
    base = centers[labels] + 0.6 * torch.randn(total, DIM, generator=gen, dtype=torch.float64)
    if case.layout == "flat":
        labels[total // 2] = CLASSES  # a class of one row: an anchor without positives
        x = base
        n_total = total
    else:
        x = base[:, None, :] + 0.9 * torch.randn(total, VIEWS, DIM, generator=gen, dtype=torch.float64)
        n_total = total * VIEWS
    weights = torch.rand(n_total, generator=gen, dtype=torch.float64) + 0.5
    return GlobalBatch(x, labels, weights, batches)


def rank_rows(case: Case, g: GlobalBatch, rank: int) -> torch.Tensor:
    """Global view-major row index of each of rank's local view-major rows."""
    off = sum(g.batches[:rank])
    b = g.batches[rank]
    if case.layout == "flat":
        return torch.arange(off, off + b)
    total = sum(g.batches)
    return torch.cat([v * total + off + torch.arange(b) for v in range(VIEWS)])


def rank_samples(g: GlobalBatch, rank: int) -> slice:
    off = sum(g.batches[:rank])
    return slice(off, off + g.batches[rank])


def as_layout(case: Case, x: torch.Tensor):
    """[B, V, D] (or flat [N, D]) -> the case's input layout."""
    if case.layout == "list":
        return [x[:, v, :] for v in range(VIEWS)]
    return x


def leaf_inputs(case: Case, x: torch.Tensor):
    """Leaf tensors that require grad, in the case's layout, and a function stacking their grads
    back to [B, V, D] (or [N, D])."""
    if case.layout == "list":
        views = [x[:, v, :].clone().requires_grad_(True) for v in range(VIEWS)]
        return views, lambda: torch.stack([v.grad for v in views], 1)
    leaf = x.clone().requires_grad_(True)
    return leaf, lambda: leaf.grad


def local_weights(case: Case, g: GlobalBatch, rank: int) -> torch.Tensor:
    """d objective / d L_i of the objective sum_r loss_r, for rank's rows."""
    rows = rank_rows(case, g, rank)
    if case.reduction == "none":
        return g.weights[rows]
    if case.reduction == "mean":
        return torch.full((rows.numel(),), 1.0 / rows.numel(), dtype=torch.float64)
    return torch.ones(rows.numel(), dtype=torch.float64)


# ---------------------------------------------------------------- the worker (one rank)
def _worker(rank: int, world: int, init_file: str, out_dir: str, backends: list) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=WORKER_TIMEOUT_S // 2))
    wg = dist.group.WORLD
    out = {"cases": {}}
    for backend in backends:
        device, dtype = backend_setup(backend)
        for i, case in enumerate(CASES):
            g = make_global(case, world, i)
            xs = g.x[rank_samples(g, rank)].to(device, dtype)
            inputs, grad_of = leaf_inputs(case, xs)
            labels = None if case.simclr else g.labels[rank_samples(g, rank)].to(device)
            loss, stats = marginal_supcon_loss(
                inputs, labels, margin=case.margin, reduction=case.reduction,
                base_temperature=case.base_temperature, backend=backend, group=wg, return_stats=True,
            )
            if case.reduction == "none":
                loss.backward(g.weights[rank_rows(case, g, rank)].to(device, loss.dtype))
            else:
                loss.backward()
            out["cases"][(backend, case.id)] = dict(
                loss=loss.detach().cpu(), grad=grad_of().cpu(), num_positives=stats.num_positives.cpu(),
                num_clipped=stats.num_clipped.cpu(), clipped_fraction=stats.clipped_fraction.cpu(),
            )

    # Settings that other ranks' statistics depend on must agree; every rank must raise.
    x = torch.randn(4, DIM)
    y = torch.arange(4)
    try:
        marginal_supcon_loss(x, y, temperature=0.15 if rank == 0 else 0.2, backend="reference", group=wg)
        out["mismatch"] = None
    except ValueError as err:
        out["mismatch"] = str(err)
    try:  # SimCLR ids on one rank, class labels on the others: positives would mean different things
        xv = torch.randn(3, VIEWS, DIM)
        marginal_supcon_loss(xv, None if rank == 0 else torch.arange(3), backend="reference", group=wg)
        out["mismatch_simclr"] = None
    except ValueError as err:
        out["mismatch_simclr"] = str(err)

    # A subgroup of ranks 0 and last: its global batch is theirs only; the rank outside is refused.
    members = [0, world - 1]
    sub = dist.new_group(members)
    case = Case("flat", False, "sum", 0.4)
    g = make_global(case, world, len(CASES))
    xs = g.x[rank_samples(g, rank)].clone().requires_grad_(True)
    try:
        loss = marginal_supcon_loss(xs, g.labels[rank_samples(g, rank)], margin=case.margin, reduction="sum",
                                    backend="reference", group=sub)
        loss.backward()
        out["subgroup"] = dict(loss=loss.detach(), grad=xs.grad)
    except ValueError as err:
        out["subgroup"] = str(err)

    dist.barrier()
    dist.destroy_process_group()
    try:
        marginal_supcon_loss(x, y, backend="reference", group=wg)
        out["after_destroy"] = None
    except RuntimeError as err:
        out["after_destroy"] = str(err)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


# ---------------------------------------------------------------- launching a world
def _tested_backends():
    return [b for b in BACKENDS if not isinstance(backend_setup(b), str)]


_worlds: dict = {}


def run_world(world: int):
    """Starts ``world`` worker processes once per test session; returns their saved results."""
    if world in _worlds:
        return _worlds[world]
    _worlds[world] = spawn_world(__file__, world, [",".join(_tested_backends())], WORKER_TIMEOUT_S, "ffkern-dist")
    return _worlds[world]


def world_results(world: int):
    res = run_world(world)
    if isinstance(res, str):
        pytest.fail(f"distributed workers failed:\n{res}")
    return res


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[c.id for c in CASES])
@pytest.mark.parametrize("world", sorted(WORLD_BATCHES))
def test_matches_single_process(world, case_index, backend):
    setup = backend_setup(backend)
    if isinstance(setup, str):
        pytest.skip(f"backend {backend!r} not tested here: {setup}")
    tol = tolerances(setup[1])
    case = CASES[case_index]
    results = [r["cases"][(backend, case.id)] for r in world_results(world)]

    # Single process on the concatenated global batch, float64, reference backend (the N x N spec).
    g = make_global(case, world, case_index)
    inputs, grad_of = leaf_inputs(case, g.x)
    loss_all, stats_all = marginal_supcon_loss(inputs, None if case.simclr else g.labels, margin=case.margin,
                                               reduction="none", base_temperature=case.base_temperature,
                                               backend="reference", return_stats=True)
    weights = torch.empty_like(loss_all)
    for rank in range(world):
        weights[rank_rows(case, g, rank)] = local_weights(case, g, rank)
    (weights * loss_all).sum().backward()  # the objective sum_r loss_r
    grad_all = grad_of()
    loss_all = loss_all.detach()

    for rank, res in enumerate(results):
        rows = rank_rows(case, g, rank)
        mine = loss_all[rows]
        expect = {"none": mine, "sum": mine.sum(), "mean": mine.sum() / rows.numel()}[case.reduction]
        torch.testing.assert_close(res["loss"].double(), expect, **tol, msg=lambda m: f"rank {rank} loss: {m}")
        torch.testing.assert_close(res["grad"].double(), grad_all[rank_samples(g, rank)], **tol,
                                   msg=lambda m: f"rank {rank} gradient: {m}")
        assert torch.equal(res["num_positives"].long(), stats_all.num_positives[rows].long())
        assert torch.equal(res["num_clipped"].long(), stats_all.num_clipped[rows].long())
        has = stats_all.num_positives[rows] > 0
        frac = (stats_all.num_clipped[rows][has].double() / stats_all.num_positives[rows][has].double()).mean()
        torch.testing.assert_close(res["clipped_fraction"].double(), frac, equal_nan=True)

    if case.reduction == "sum":  # the sum over ranks is the single-process "sum" of the global batch
        single = marginal_supcon_loss(as_layout(case, g.x), None if case.simclr else g.labels, margin=case.margin,
                                      reduction="sum", base_temperature=case.base_temperature, backend="reference")
        torch.testing.assert_close(sum(r["loss"].double() for r in results), single, **tol)


@pytest.mark.parametrize("world", sorted(WORLD_BATCHES))
def test_cases_exercise_clipping_and_anchors_without_positives(world):
    """Guards the test data: with margin 0.4 some positives are clipped and some are not, and the
    flat layout has anchors without positives (they count as 0 in the mean)."""
    results = world_results(world)
    for case in CASES:
        key = ("reference", case.id)
        pos = torch.cat([r["cases"][key]["num_positives"] for r in results])
        clipped = torch.cat([r["cases"][key]["num_clipped"] for r in results])
        if case.margin == 0.4 and case.layout != "flat":
            assert 0 < clipped.sum() < pos.sum(), case.id
    flat = [c for c in CASES if c.layout == "flat"]
    assert any((torch.cat([r["cases"][("reference", c.id)]["num_positives"] for r in results]) == 0).any()
               for c in flat)


@pytest.mark.parametrize("world", sorted(WORLD_BATCHES))
def test_mismatched_settings_raise_on_every_rank(world):
    for rank, res in enumerate(world_results(world)):
        assert res["mismatch"] is not None, f"rank {rank} accepted ranks disagreeing on temperature"
        assert "temperature" in res["mismatch"]
        assert res["mismatch_simclr"] is not None, f"rank {rank} mixed SimCLR and labelled ranks"
        assert "SimCLR" in res["mismatch_simclr"]


@pytest.mark.parametrize("world", sorted(WORLD_BATCHES))
def test_subgroup(world):
    results = world_results(world)
    members = [0, world - 1]
    case = Case("flat", False, "sum", 0.4)
    g = make_global(case, world, len(CASES))
    xs = torch.cat([g.x[rank_samples(g, r)] for r in members]).requires_grad_(True)
    ys = torch.cat([g.labels[rank_samples(g, r)] for r in members])
    single = marginal_supcon_loss(xs, ys, margin=case.margin, reduction="sum", backend="reference")
    single.backward()
    total, start = 0.0, 0
    for r in members:
        res = results[r]["subgroup"]
        assert not isinstance(res, str), f"rank {r} refused its own subgroup: {res}"
        total = total + res["loss"]
        n = g.batches[r]
        torch.testing.assert_close(res["grad"], xs.grad[start:start + n], rtol=1e-9, atol=1e-11)
        start += n
    torch.testing.assert_close(total, single.detach(), rtol=1e-9, atol=1e-11)
    for r in range(world):
        if r not in members:
            assert isinstance(results[r]["subgroup"], str) and "not a member" in results[r]["subgroup"]


@pytest.mark.parametrize("world", sorted(WORLD_BATCHES))
def test_uninitialized_group_is_refused(world):
    for res in world_results(world):
        assert res["after_destroy"] is not None and "init_process_group" in res["after_destroy"]


@pytest.mark.parametrize("bad", [object(), "world", 0, True])
def test_group_must_be_a_process_group(bad):
    x, y = torch.randn(4, DIM), torch.arange(4)
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
        marginal_supcon_loss(x, y, backend="reference", group=bad)


def test_non_member_sentinel_is_refused():
    import torch.distributed as dist

    x, y = torch.randn(4, DIM), torch.arange(4)
    with pytest.raises(ValueError, match="not a member"):
        marginal_supcon_loss(x, y, backend="reference", group=dist.GroupMember.NON_GROUP_MEMBER)


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    _, _, rank_arg, world_arg, init_file_arg, out_dir_arg, backends_arg = sys.argv
    _worker(int(rank_arg), int(world_arg), init_file_arg, out_dir_arg, [b for b in backends_arg.split(",") if b])
