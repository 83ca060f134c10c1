"""Layer-wise pruning for SPADE: the OBS-family solvers.

A layer with weight ``W`` (``[out, in]``, or a conv weight flattened to ``[out, in*kh*kw]``) is
pruned by solving the reconstruction problem ``min ||W X - W_hat X||^2`` over a sparse ``W_hat``,
where ``X`` holds the layer's inputs (a conv's inputs unfolded into columns). Everything a solver
needs from ``X`` is the Hessian ``H = (2/N) X X^T``, which :func:`spade_lib.hessians.layer_hessians`
collects once for every chosen layer in one pass over the data; :func:`prune_layer` solves each
layer from it. Which layers are pruned and how sparse is :mod:`spade_lib.schedules`.

Solvers (``method``, registered by name in :data:`SOLVERS`, see :func:`register_solver`):

``obc``
    Exact Optimal Brain Compression: per row, greedy OBS removals with rank-1 downdates of the
    row's inverse Hessian, and a global per-layer budget that assigns removals to rows by loss.
``fastobc``
    SparseGPT-style: one Cholesky factor of the damped inverse Hessian for the whole layer, columns
    swept left to right, mask chosen per group of columns, errors pushed onto later columns.
    Batched so that it is not bound by the number of operations it dispatches (a GPU kernel
    launch each): every sample of every layer of one width and mask group in one sweep
    (:func:`prune_layers`), a mask group of ``g > 1`` columns in one triangular solve, five
    operations per one-column group. ResNet-50's 53 layers: 32,773 operations per sample
    instead of 259,427, 9,297 per sample in a batch of 4 (``benchmarks/bench_solver.py``).
``magnitude``
    The smallest ``|w|`` of the layer removed, nothing compensated (the baseline).

Rounding: ``magnitude`` and ``obc`` prune exactly ``round(sparsity * W.numel())`` weights;
``fastobc`` prunes ``round(sparsity * rows * g)`` weights in each group of ``g`` columns (the
SparseGPT rule), so the layer total is within half a weight per group of the target. ``round``
rounds halves up. A budget never takes every weight of its group (at most ``size - 1``): the
sparsity is below 1, so a layer emptied by rounding (a ``Linear(4, 3)`` head at 0.99 rounds 11.88
up to all 12 weights) would be an artefact that zeroes every saliency map; the weights so kept are
reported (:attr:`PruneInfo.spared`). Weights of dead inputs (``H_jj == 0``) are set to zero by the
Hessian solvers: they cannot change the layer's output on the data. They are pruned first and
count towards the budget, but where they outnumber it (a dead input channel is a whole group of a
conv) the layer ends above its target: :attr:`PruneInfo.excess` counts the zero weights beyond
the budget.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from spade_lib.hessians import conv_columns, eval_mode, layer_hessians  # noqa: F401 (re-exported)
from spade_lib.schedules import (  # noqa: F401 (re-exported: the old import paths keep working)
    LinearSchedule,
    OnlyBlocks,
    SparsitySpec,
    default_layers,
    linear,
    only,
    prunable_layers,
    resolve_sparsity,
    select_layers,
)
from spade_lib.schedules import check_sparsity as _check_sparsity

__all__ = [
    "METHODS", "SOLVERS", "PruneInfo", "Solver", "SparsityTargetWarning", "check_method",
    "default_mask_group", "get_solver", "obc_batch_bytes", "prune_layer", "prune_layer_batch",
    "prune_layers", "reconstruction_errors", "register_solver",
]

METHODS = ("fastobc", "obc", "magnitude")
"""The built-in solvers, in the order the paper compares them (:data:`SOLVERS` holds them all)."""
MAX_DAMP_TRIES = 8
MIN_GROUP_WEIGHTS = 128


def default_mask_group(shape: Sequence[int]) -> int:
    """FastOBC's default mask group (columns) for a weight of ``shape``.

    The paper's group is one input channel: ``kh*kw`` columns of a conv, one column of a linear
    layer. A group's budget is ``round(sparsity * rows * group)``, so with few output rows it is
    coarse: a 10-class linear head at 0.95 would lose every weight of every column. The group is
    therefore widened by whole input channels until it holds at least
    :data:`MIN_GROUP_WEIGHTS` weights (rounding then costs under 0.4% sparsity per group). Layers
    of the paper's size (ImageNet heads, convs with 16+ filters) keep the paper's group.
    """
    rows, per_channel = int(shape[0]), math.prod(shape[2:])
    channels = math.ceil(MIN_GROUP_WEIGHTS / (rows * per_channel))
    return min(per_channel * channels, math.prod(shape[1:]))



# --------------------------------------------------------------------------------------------
# The solver registry
# --------------------------------------------------------------------------------------------

SolveFn = Callable[[Tensor, Tensor, tuple[int, ...], float, Mapping[str, Any]],
                   tuple[Tensor, Tensor, int]]
SolveLayersFn = Callable[[Sequence[tuple[Tensor, Tensor, tuple[int, ...], float]],
                          Mapping[str, Any], Callable[[int], None]],
                         list[tuple[Tensor, Tensor, int]]]


@dataclass(frozen=True)
class Solver:
    """A pruning method: its name, the options it accepts and the function that solves.

    ``solve(w, h, shape, sparsity, options)`` receives the flattened weights ``[S, rows, n]`` (in
    the compute dtype, possibly a broadcast view: not to be modified in place), the undamped
    Hessians ``[S, n, n]``, the layer's weight shape and the checked options. It returns the
    pruned weights ``[S, rows, n]``, the relative damping used per sample (``[S]``, float64;
    zeros for a solver without damping) and the mask group in columns (``n``: the whole row).
    ``solve_layers(problems, options, advance)``, where a solver has one, does the same for a
    list of ``(w, h, shape, sparsity)`` problems at once, calling ``advance(k)`` as ``k`` more
    layers are done (:func:`prune_layers` uses it).
    """

    name: str
    options: tuple[str, ...]
    solve: SolveFn
    solve_layers: SolveLayersFn | None = None

    def run(self, problems: Sequence[tuple[Tensor, Tensor, tuple[int, ...], float]],
            options: Mapping[str, Any], advance: Callable[[int], None] = lambda k: None,
            ) -> list[tuple[Tensor, Tensor, int]]:
        """Solve every problem: at once with ``solve_layers``, else one ``solve`` each."""
        if self.solve_layers is not None:
            return self.solve_layers(problems, options, advance)
        out = []
        for problem in problems:
            out.append(self.solve(*problem, options))
            advance(1)
        return out


SOLVERS: dict[str, Solver] = {}
"""Solver name -> :class:`Solver`; :func:`prune_layer` looks ``method`` up here."""


def register_solver(name: str, options: Sequence[str] = (),
                    layers: SolveLayersFn | None = None) -> Callable[[SolveFn], SolveFn]:
    """Decorator that adds a solve function to :data:`SOLVERS` under ``name``.

    ``options`` are the keyword options the solver accepts (others are refused by
    :func:`check_method`); ``layers`` an optional function that solves several layers at once
    (:attr:`Solver.solve_layers`). Raises ``ValueError`` if ``name`` is taken.
    """
    def wrap(fn: SolveFn) -> SolveFn:
        if name in SOLVERS:
            raise ValueError(f"pruning method {name!r} is already registered")
        SOLVERS[name] = Solver(name, tuple(options), fn, layers)
        return fn

    return wrap


def get_solver(method: str) -> Solver:
    """The registered solver called ``method``.

    Raises ``ValueError`` listing the valid names if there is none.
    """
    if not isinstance(method, str) or method not in SOLVERS:
        raise ValueError(f"unknown pruning method {method!r}; valid methods: "
                         f"{', '.join(SOLVERS)}")
    return SOLVERS[method]


# --------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PruneInfo:
    """What happened to one layer: achieved sparsity, damping used and reconstruction error.

    ``error`` is ``tr((W - W_hat) H (W - W_hat)^T)`` with the undamped ``H`` (that is
    ``(2/N) ||(W - W_hat) X||^2``), ``rel_error`` the same divided by ``tr(W H W^T)``. ``damp`` is
    the relative damping (fraction of the mean diagonal of ``H``) that made the factorisation work;
    it is larger than requested when ``H`` was not positive definite. Counts (weights):
    ``weights`` in the layer, ``budget`` the solver removes (the rounding of the target, see the
    module notes), ``pruned`` zero after pruning (``sparsity * weights``), ``spared`` kept because
    a budget may not take a whole group.
    """

    method: str
    target: float
    sparsity: float
    damp: float
    error: float
    rel_error: float
    seconds: float
    weights: int = 0
    budget: int = 0
    pruned: int = 0
    spared: int = 0

    @property
    def excess(self) -> int:
        """Zero weights beyond the budget (dead inputs beyond a group's budget, weights that were
        zero already); positive means the layer is above its target by more than rounding."""
        return max(self.pruned - self.budget, 0)

    @property
    def empty(self) -> bool:
        """Every weight of the layer is zero (every saliency map through it is constant)."""
        return self.weights > 0 and self.pruned == self.weights


class SparsityTargetWarning(UserWarning):
    """A pruned layer is empty, above its target beyond rounding, or kept weights by rounding."""


def _round(x: float) -> int:
    """Round half up (Python's ``round`` rounds half to even)."""
    return math.floor(x + 0.5)


def _budget(sparsity: float, size: int) -> int:
    """Weights removed from a group of ``size``: ``round(sparsity * size)``, never all of them."""
    return min(_round(sparsity * size), max(size - 1, 0))


def _budgets(sparsity: float, rows: int, n: int, group: int) -> tuple[int, int]:
    """``(budget, spared)`` of a ``[rows, n]`` weight whose mask groups have ``group`` columns:
    the weights removed and the weights kept only because a budget may not take a whole group."""
    sizes = [rows * (min(g + group, n) - g) for g in range(0, n, group)]
    budget = sum(_budget(sparsity, size) for size in sizes)
    return budget, sum(_round(sparsity * size) for size in sizes) - budget


def check_method(method: str, options: Mapping[str, Any]) -> None:
    """Validate a solver name and its options (raises ``ValueError`` naming what is allowed)."""
    allowed_options = get_solver(method).options
    unknown = sorted(set(options) - set(allowed_options))
    if unknown:
        allowed = ", ".join(allowed_options) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; "
                         f"allowed: {allowed}")
    damp = options.get("damp", 0.01)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")
    group = options.get("mask_group")
    if group is not None and group != "row" and (
            isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise ValueError(f"mask_group must be an int >= 1, 'row' or None, got {group!r}")
    for key in ("block_size", "batch_bytes"):
        value = options.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")


TRIANGULAR_LEAF = 1024
""":func:`_tril_inverse` inverts blocks up to this size with one triangular solve (as fast as
smaller blocks on 2 CPU cores, and a ninth of the operations of 128-wide blocks for a
4608-wide layer: 79 instead of 695)."""


def _tril_inverse(low: Tensor) -> Tensor:
    """Inverse of lower-triangular matrices ``[..., n, n]`` by 2x2 blocks (``n^3 / 3`` flops)."""
    n = low.shape[-1]
    if n <= TRIANGULAR_LEAF:
        eye = torch.eye(n, dtype=low.dtype, device=low.device)
        return torch.linalg.solve_triangular(low, eye, upper=False)
    m = n // 2
    a, c = _tril_inverse(low[..., :m, :m]), _tril_inverse(low[..., m:, m:])
    out = torch.zeros_like(low)
    out[..., :m, :m], out[..., m:, m:] = a, c
    out[..., m:, :m] = -c @ (low[..., m:, :m] @ a)
    return out


def _damped_inverse(h: Tensor, damp: float, upper: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Damp ``h`` ``[S, n, n]`` and invert it by Cholesky, raising the damping where it fails.

    Returns the damped Hessians, their inverses (or, with ``upper``, the upper Cholesky factors
    ``U`` of the inverses, ``U^T U = H^-1``) and the relative damping used per sample. ``U`` comes
    from one factorisation: with ``P`` the reversal permutation and ``P H P = L L^T``,
    ``U = P L^-1 P``. Raises ``RuntimeError`` if even heavy damping does not help: a layer is
    never left unpruned silently.
    """
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)
    damps = torch.full(mean_diag.shape, float(damp), dtype=torch.float64, device=h.device)
    for _ in range(MAX_DAMP_TRIES):
        hd = h + (damps * mean_diag).to(h.dtype)[:, None, None] * eye
        if upper:
            chol, info = torch.linalg.cholesky_ex(hd.flip(-2, -1))
            inv = _tril_inverse(chol).flip(-2, -1)
        else:
            chol, info = torch.linalg.cholesky_ex(hd)
            inv = torch.cholesky_inverse(chol)
        bad = (info != 0) | ~torch.isfinite(inv).flatten(1).all(1)
        if not bad.any():
            return hd, inv, damps
        damps = torch.where(bad, torch.where(damps > 0, damps * 10, 0.01), damps)
    raise RuntimeError(f"Hessian not positive definite even with relative damping "
                       f"{damps.max().item():g}; the layer cannot be pruned reliably")


def _drop_dead(w: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the weights of dead inputs (``H_jj == 0``) and give those a unit diagonal."""
    dead = h.diagonal(dim1=-2, dim2=-1) == 0
    if dead.any():
        h = h.clone()
        h.diagonal(dim1=-2, dim2=-1).masked_fill_(dead, 1.0)
        w = w.masked_fill(dead[:, None, :], 0.0)
    return w, h


def _select_smallest(scores: Tensor, count: int) -> Tensor:
    """Boolean mask of the ``count`` smallest entries of each sample ``scores[s]``."""
    flat = scores.flatten(1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, flat.topk(count, dim=1, largest=False).indices, True)
    return mask.view_as(scores)


def _lazy_blocks(n: int, group: int, block: int) -> list[tuple[int, int]]:
    """Column blocks for the lazy updates that never cut a mask group off its start."""
    if group <= block:
        step = block // group * group
        return [(i, min(i + step, n)) for i in range(0, n, step)]
    return [(i, min(i + block, g + group, n))
            for g in range(0, n, group) for i in range(g, min(g + group, n), block)]


TRIANGULAR_ELEMENTS = 2**24
"""Largest ``[B, rows, g, g]`` batch of per-row systems in which FastOBC solves one mask group's
errors at once (:func:`_group_solved`). A larger group, or one wider than the lazy-update block
(``block_size``; ``mask_group="row"`` on a wide layer), is swept column by column with its mask
fixed at the group's start (:func:`_group_columns`)."""


def _smallest(x: Tensor, k: int) -> Tensor:
    """``1.0`` at exactly the ``k`` smallest ``|x|`` of each sample's ``x[s]`` (ties broken by
    ``topk``), ``0.0`` elsewhere, in ``x``'s shape and dtype."""
    flat = torch.zeros(x.shape[0], x[0].numel(), dtype=x.dtype, device=x.device)
    if k:
        flat.scatter_(1, x.abs().view(x.shape[0], -1).topk(k, 1, largest=False,
                                                             sorted=False).indices, 1.0)
    return flat.view_as(x)


def _columns_selected(vb: Tensor, eb: Tensor, ub: Tensor, kth: Sequence[int]) -> None:
    """One-column mask groups: each column of the block chooses its own mask, in turn.

    ``vb``, ``eb`` ``[B, b, R]`` are the block's scaled weights and errors (views, one column per
    contiguous row), ``ub`` ``[B, b, b]`` its part of the scaled factor. Column ``j``'s current
    value is its stored value less the errors of the block's earlier columns (one batched
    product); exactly the ``kth[j]`` smallest ``|x|`` of the column are pruned (``topk``) and
    their values become the column's errors (``eb`` is zero before). Five operations per
    column.
    """
    cols = ub.transpose(1, 2).split(1, 1)                         # [B, 1, b]: uhat[:, j] each
    for t, (k, vj, ej) in enumerate(zip(kth, vb.split(1, 1), eb.split(1, 1), strict=True)):
        if k:
            x = torch.baddbmm(vj, cols[t][:, :, :t], eb[:, :t], alpha=-1)      # [B, 1, R]
            pruned = x.abs().topk(k, 2, largest=False, sorted=False).indices
            ej.scatter_(2, pruned, x.gather(2, pruned))


def _group_solved(vb: Tensor, eb: Tensor, ub: Tensor, cols: slice, k: int) -> None:
    """A mask group of ``g`` columns in one step: mask at the group's start, errors by one solve.

    With the mask ``m`` fixed, column ``t`` of the group is ``y_t = x_t - sum_{s<t} L_ts m_s
    y_s``, where ``x`` is the group's value at its start and ``L_ts = uhat[s, t]``, and its error
    is ``m_t y_t``: per row a unit lower-triangular system ``(I + L diag(m)) y = x`` of size
    ``g``, solved for every row and sample at once (SparseGPT's column loop, unrolled). Eight
    operations per group.
    """
    x = torch.baddbmm(vb[:, cols], ub[:, :cols.start, cols].transpose(1, 2), eb[:, :cols.start],
                      alpha=-1)                                                # [B, g, R]
    m = _smallest(x, k).transpose(1, 2)                                       # [B, R, g]
    low = ub[:, cols, cols].transpose(1, 2)                                   # [B, g, g]
    y = torch.linalg.solve_triangular(low[:, None] * m[:, :, None, :],
                                      x.transpose(1, 2)[..., None],
                                      upper=False, unitriangular=True)         # [B, R, g, 1]
    torch.mul(m, y[..., 0], out=eb[:, cols].transpose(1, 2))


def _group_columns(v: Tensor, uhat: Tensor, err: Tensor, i1: int, i2: int, group: int,
                   kth: Sequence[int], mask: Tensor | None) -> Tensor | None:
    """Columns ``i1:i2`` of groups too large for :func:`_group_solved`, one at a time: a group's
    mask is chosen where it starts (over all its columns, from their values then) and kept
    across blocks; each column's error is its current value where masked. Returns the mask of
    the group in progress."""
    n = v.shape[1]
    eb = err[:, i1:i2]
    cols = uhat[:, i1:i2, i1:i2].transpose(1, 2).split(1, 1)
    for j, vj, ej in zip(range(i1, i2), v[:, i1:i2].split(1, 1), eb.split(1, 1), strict=True):
        if j % group == 0:
            g = slice(j, min(j + group, n))
            x = torch.baddbmm(v[:, g], uhat[:, i1:j, g].transpose(1, 2), err[:, i1:j], alpha=-1)
            mask = _smallest(x, kth[j // group])
        t = j % group
        x = torch.baddbmm(vj, cols[j - i1][:, :, :j - i1], eb[:, :j - i1], alpha=-1)
        torch.mul(x, mask[:, t:t + 1], out=ej)
    return mask


def _sweep(v: Tensor, uhat: Tensor, kth: Sequence[int], group: int, block: int) -> Tensor:
    """FastOBC's column sweep on a batch of problems of equal width, in scaled coordinates.

    ``v`` ``[B, n, R]`` holds ``W[:, j] / U_jj`` as row ``j`` (one column of the weight per
    contiguous row) and ``uhat`` ``[B, n, n]`` holds ``U_kj / U_jj`` (``U`` the upper Cholesky
    factor of the damped inverse Hessian), so that a column's score ``w^2 / U_jj^2`` is ``v^2``
    and pruning it pushes ``uhat[j, j+1:] * v_j`` onto the later columns. ``kth[g]`` is the rank
    of the pruning threshold in mask group ``g`` (0: the group keeps everything). Errors are
    gathered per block of columns and pushed onto the block itself and every later column in
    one product per block (SparseGPT's lazy batching). ``v`` ends compensated (pruned entries
    not yet zeroed); returns the errors ``[B, n, R]``, non-zero where a weight was pruned with a
    non-zero value.
    """
    B, n, R = v.shape
    err = torch.zeros_like(v)
    solved = 1 < group <= block and B * R * group * group <= TRIANGULAR_ELEMENTS
    mask = None
    for i1, i2 in _lazy_blocks(n, group, block):
        vb, eb, ub = v[:, i1:i2], err[:, i1:i2], uhat[:, i1:i2, i1:i2]
        if group == 1:
            _columns_selected(vb, eb, ub, kth[i1:i2])
        elif solved:
            for g0 in range(i1, i2, group):
                if kth[g0 // group]:
                    _group_solved(vb, eb, ub, slice(g0 - i1, min(g0 + group, i2) - i1),
                                  kth[g0 // group])
        else:
            mask = _group_columns(v, uhat, err, i1, i2, group, kth, mask)
        v[:, i1:].baddbmm_(uhat[:, i1:i2, i1:].transpose(1, 2), eb, alpha=-1)
    return err


SEPARATE_FACTORS = 1024
"""On the CPU, Hessians at least this wide are factored one layer at a time: a batched matrix
product of that size is slower there than the same products one by one (a [3, 4608, 4608]
factorisation took 3.0 s batched, 2.5 s one by one, on 2 cores)."""


def _factors(hessians: Sequence[Tensor], damp: float) -> tuple[Tensor, Tensor]:
    """The upper Cholesky factors of the damped inverses of the Hessians ``[S_i, n, n]`` of
    several layers, concatenated, with the relative damping each sample needed."""
    if len(hessians) == 1:
        _, u, damps = _damped_inverse(hessians[0], damp, upper=True)
        return u, damps
    if hessians[0].is_cuda or hessians[0].shape[-1] < SEPARATE_FACTORS:
        _, u, damps = _damped_inverse(torch.cat(list(hessians)), damp, upper=True)
        return u, damps
    solved = [_damped_inverse(h, damp, upper=True)[1:] for h in hessians]
    return torch.cat([u for u, _ in solved]), torch.cat([d for _, d in solved])


@dataclass
class _Problem:
    """One layer for :func:`_fastobc_layers`: weights ``[S, R, n]``, Hessians ``[S, n, n]``
    (both read only), target and mask group."""

    w: Tensor
    h: Tensor
    sparsity: float
    group: int

    def budgets(self) -> list[int]:
        rows, n = self.w.shape[1], self.w.shape[2]
        return [_budget(self.sparsity, rows * (min(g + self.group, n) - g))
                for g in range(0, n, self.group)]


def _chunks(problems: Sequence[_Problem], rows: int,
            batch_bytes: int) -> list[list[tuple[int, int, int]]]:
    """``(problem, first sample, end sample)`` pieces, in order, grouped so that a group's
    memory stays within about ``batch_bytes`` (at least one sample each). A sample costs its
    weights and errors at ``rows`` padded rows and about three ``n x n`` matrices (the damped
    Hessian, its factor and its inverse while they are made)."""
    chunks: list[list[tuple[int, int, int]]] = [[]]
    used = 0
    for i, p in enumerate(problems):
        S, _, n = p.w.shape
        each = (3 * n * n + 2 * rows * n) * p.w.element_size()
        s = 0
        while s < S:
            room = max((batch_bytes - used) // each, 0 if chunks[-1] else 1)
            if room == 0:
                chunks.append([])
                used = 0
                continue
            take = min(room, S - s)
            chunks[-1].append((i, s, s + take))
            used += take * each
            s += take
    return chunks


def _fastobc_layers(problems: Sequence[_Problem], damp: float, block: int,
                    batch_bytes: int) -> tuple[list[Tensor], list[Tensor]]:
    """FastOBC for layers of one width ``n`` and one mask group, solved as one batch.

    Every sample of every layer is one entry of a batch ``[B, n, rows]`` (one column of the
    weight per row). A layer with fewer rows than the batch's largest is padded with rows
    that never change: the largest float (never pruned) and zeros (always among the smallest),
    as many zeros per mask group as the batch's largest budget there exceeds the layer's own,
    so that one count per group (``topk``) prunes exactly each layer's budget; ``rows`` may
    exceed the largest layer's rows by those zeros. Dead inputs are zeroed per batch
    (:func:`_drop_dead`). Returns the pruned weights ``[S, R, n]`` and the relative damping used
    ``[S]`` per layer.
    """
    group, n = problems[0].group, problems[0].w.shape[2]
    dtype, device = problems[0].w.dtype, problems[0].w.device
    budgets = [p.budgets() for p in problems]
    sizes = [min(g + group, n) - g for g in range(0, n, group)]
    col_group = torch.arange(n, device=device) // group
    col_size = torch.tensor(sizes, device=device)[col_group]
    col_offset = torch.arange(n, device=device) % group
    bound = max(p.w.shape[1] for p in problems) + max(
        -(-max(b[g] for b in budgets) // sizes[g]) for g in range(len(sizes)))
    outs = [torch.empty_like(p.w) for p in problems]
    damps = [torch.empty(p.w.shape[0], dtype=torch.float64) for p in problems]
    for chunk in _chunks(problems, bound, batch_bytes):
        members = sorted({i for i, _, _ in chunk})
        kth = [max(budgets[i][g] for i in members) for g in range(len(sizes))]
        spare = {i: max(-(-(kth[g] - budgets[i][g]) // sizes[g]) for g in range(len(sizes)))
                 for i in members}
        rows = max(problems[i].w.shape[1] + spare[i] for i in members)
        pieces = [_drop_dead(problems[i].w[s:e], problems[i].h[s:e]) for i, s, e in chunk]
        uhat, chunk_damps = _factors([h for _, h in pieces], damp)
        chunk_damps = chunk_damps.cpu()
        diag = uhat.diagonal(dim1=-2, dim2=-1)[:, :, None].clone()          # [B, n, 1]
        uhat /= diag.transpose(1, 2)
        v = torch.full((len(uhat), n, rows), torch.finfo(dtype).max, dtype=dtype, device=device)
        at = 0
        for (i, s, e), (w, _) in zip(chunk, pieces, strict=True):
            r = w.shape[1]
            torch.div(w.transpose(1, 2), diag[at:at + e - s], out=v[at:at + e - s, :, :r])
            zeros = torch.tensor([kth[g] - budgets[i][g] for g in range(len(sizes))],
                                 device=device)[col_group]
            pad = (torch.arange(rows - r, device=device) * col_size[:, None]
                   + col_offset[:, None] < zeros[:, None])                    # [n, rows - r]
            v[at:at + e - s, :, r:].masked_fill_(pad, 0.0)
            damps[i][s:e] = chunk_damps[at:at + e - s]
            at += e - s
        del pieces
        err = _sweep(v, uhat, kth, group, block)
        v.masked_fill_(err != 0, 0.0)
        del err, uhat
        at = 0
        for i, s, e in chunk:
            r = problems[i].w.shape[1]
            outs[i][s:e] = (v[at:at + e - s, :, :r] * diag[at:at + e - s]).transpose(1, 2)
            at += e - s
    return outs, damps


OBC_COMPACT = 8
"""Exact OBC drops the removed inputs from each row's inverse Hessian whenever the active inputs
have shrunk by this fraction (1/8) since the last compaction: a removed input's row and column
of ``H^-1`` are zero after its update, so dropping them changes nothing but the work, which
falls from ``n^3`` to about ``0.38 n^3`` per row."""


def _obc_pass(wr: Tensor, hi: Tensor, order: Tensor, losses: Tensor) -> None:
    """Pass 1 of :func:`_obc` for a batch of rows: the greedy OBS removals to the end.

    ``wr`` ``[b, n]`` and ``hi`` ``[b, n, n]`` (each row's own ``H^-1``) are worked in place;
    ``order`` and ``losses`` ``[b, n]`` receive each step's removed input (original index) and
    its loss ``w_j^2 / [H^-1]_jj``. Removed inputs stay in place, masked, until the next
    compaction (:data:`OBC_COMPACT`), when every row drops them (all rows have removed the same
    number, so the batch stays rectangular).
    """
    b, n = wr.shape
    ar = torch.arange(b, device=wr.device)
    alive = torch.arange(n, device=wr.device).expand(b, n).clone()   # original index per slot
    done = torch.zeros_like(wr, dtype=torch.bool)
    t = 0
    while t < n:
        m = n - t
        for _ in range(max(1, m // OBC_COMPACT)):
            diag = hi.diagonal(dim1=1, dim2=2)
            scores = (wr**2 / diag).masked_fill_(done, math.inf)
            j = scores.argmin(1)
            losses[:, t], order[:, t] = scores[ar, j], alive[ar, j]
            col = hi[ar, :, j]                           # [b, m]: column j of each row's H^-1
            dj = col[ar, j].clone()
            wr.sub_(col * (wr[ar, j] / dj)[:, None])
            hi.baddbmm_(col[:, :, None], (col / dj[:, None])[:, None, :], alpha=-1)
            done[ar, j] = True
            t += 1
        if t < n:
            keep = (~done).nonzero()[:, 1].view(b, n - t)  # row-major: each row's kept slots
            hi = hi[ar[:, None, None], keep[:, :, None], keep[:, None, :]]
            wr, alive = wr.gather(1, keep), alive.gather(1, keep)
            done = torch.zeros_like(wr, dtype=torch.bool)


def _obc(w: Tensor, hd: Tensor, hinv: Tensor, sparsity: float, batch_bytes: int) -> Tensor:
    """Exact OBC for one layer: ``w`` ``[rows, n]``, damped ``hd`` and its inverse ``hinv``.

    Pass 1 runs the greedy OBS removal to the end for every row (rows batched, each with its own
    copy of ``H^-1``, rank-1 downdated after each removal, removed inputs dropped from time to
    time: :func:`_obc_pass`) and keeps only the removal order and the loss of each step. The
    budget then gives each row its number of removals: the loss increments of a row are taken in
    order, and the layer takes the globally cheapest ones, a row's next increment costing the
    largest increment so far (a heap greedy over rows). Pass 2 rebuilds each row's weights for
    its pruned set with the optimal least-squares compensation ``w_K += H_KK^-1 H_KP w_P``, which
    is what the sequential OBS updates arrive at.
    """
    rows, n = w.shape
    order = torch.empty(rows, n, dtype=torch.long, device=w.device)
    losses = torch.empty(rows, n, dtype=w.dtype, device=w.device)
    step = max(1, batch_bytes // (n * n * w.element_size()))
    for r1 in range(0, rows, step):
        r2 = min(r1 + step, rows)
        _obc_pass(w[r1:r2].clone(), hinv.expand(r2 - r1, n, n).clone(), order[r1:r2],
                  losses[r1:r2])
    total = _budget(sparsity, rows * n)
    keys = losses.cummax(1).values.flatten()
    chosen = keys.sort(stable=True).indices[:total]
    counts = torch.bincount(chosen // n, minlength=rows)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    pruned.scatter_(1, order, torch.arange(n, device=w.device)[None] < counts[:, None])
    out = torch.empty_like(w)
    step = max(1, batch_bytes // (2 * n * n * w.element_size()))
    for r1 in range(0, rows, step):
        r2 = min(r1 + step, rows)
        p, wr = pruned[r1:r2], w[r1:r2]
        keep = (~p).to(w.dtype)
        system = hd * (keep[:, :, None] * keep[:, None, :]) + torch.diag_embed(p.to(w.dtype))
        rhs = ((wr * p) @ hd) * keep
        delta = torch.cholesky_solve(rhs[:, :, None], torch.linalg.cholesky(system))[..., 0]
        out[r1:r2] = (wr + delta) * keep
    return out


def _magnitude(w: Tensor, sparsity: float) -> Tensor:
    mask = _select_smallest(w.abs(), _budget(sparsity, w[0].numel()))
    return w.masked_fill(mask, 0.0)


def _solve_fastobc_layers(problems: Sequence[tuple[Tensor, Tensor, tuple[int, ...], float]],
                          options: Mapping[str, Any],
                          advance: Callable[[int], None] = lambda k: None,
                          ) -> list[tuple[Tensor, Tensor, int]]:
    """FastOBC for several layers: those of equal width and mask group are solved as one batch
    (:func:`_fastobc_layers`), so the number of operations grows with the distinct widths, not
    with the layers."""
    damp = float(options.get("damp", 0.01))
    block = options.get("block_size", 128)
    batch_bytes = options.get("batch_bytes", 2**31)
    items = []
    for w, h, shape, sparsity in problems:
        n = h.shape[-1]
        group = options.get("mask_group")
        group = default_mask_group(shape) if group is None else group
        group = n if group == "row" else min(group, n)
        items.append(_Problem(w, h, sparsity, group))
    same: dict[tuple, list[int]] = {}
    for i, p in enumerate(items):
        same.setdefault((p.w.shape[2], p.group, p.w.dtype, p.w.device), []).append(i)
    results: list[tuple[Tensor, Tensor, int]] = [None] * len(items)  # type: ignore[list-item]
    for members in same.values():
        outs, damps = _fastobc_layers([items[i] for i in members], damp, block, batch_bytes)
        for i, out, d in zip(members, outs, damps, strict=True):
            results[i] = (out, d, items[i].group)
        advance(len(members))
    return results


def _solve_fastobc(w: Tensor, h: Tensor, shape: tuple[int, ...], sparsity: float,
                   options: Mapping[str, Any]) -> tuple[Tensor, Tensor, int]:
    """FastOBC for one layer (:func:`_solve_fastobc_layers` with one problem)."""
    return _solve_fastobc_layers([(w, h, shape, sparsity)], options)[0]


register_solver("fastobc", options=("damp", "mask_group", "block_size", "batch_bytes"),
                layers=_solve_fastobc_layers)(_solve_fastobc)


def obc_batch_bytes(device: torch.device) -> int:
    """OBC's default ``batch_bytes``: 256 MiB on the CPU; on a GPU a quarter of the memory
    PyTorch could still use there (free on the device plus its own cached, unused blocks), at
    least 256 MiB (a batch's copies of ``H^-1`` are copied once more when removed inputs are
    dropped, and pass 2 needs two per row).

    On a GPU OBC is bound by memory traffic and launches, not arithmetic: every removal step
    rank-1 downdates each row's ``H^-1`` (one operation per row batch), so fewer, larger row
    batches mean fewer launches. For torchvision's ResNet-50 (53 layers, widths summing to 54,784
    columns, about 19 operations per column and row batch) that is 7.4 million operations with 2
    GiB batches and 1.0 million with 64 GiB; the downdates themselves move about 514 TB (107 s at
    an H200's 4.8 TB/s), whatever the batching. Each row is solved on its own, so the batch size
    changes the speed, not which weights are pruned.
    """
    if device.type != "cuda":
        return 2**28
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(2**28, (free + cached) // 4)


@register_solver("obc", options=("damp", "batch_bytes"))
def _solve_obc(w: Tensor, h: Tensor, shape: tuple[int, ...], sparsity: float,
               options: Mapping[str, Any]) -> tuple[Tensor, Tensor, int]:
    """Exact OBC (:func:`_obc`), one sample at a time, rows batched within ``batch_bytes``."""
    w, hclean = _drop_dead(w, h)
    hd, hinv, damps = _damped_inverse(hclean, float(options.get("damp", 0.01)), upper=False)
    batch_bytes = options.get("batch_bytes") or obc_batch_bytes(w.device)
    out = torch.stack([_obc(w[s], hd[s], hinv[s], sparsity, batch_bytes)
                       for s in range(w.shape[0])])
    return out, damps, h.shape[-1]


@register_solver("magnitude")
def _solve_magnitude(w: Tensor, h: Tensor, shape: tuple[int, ...], sparsity: float,
                     options: Mapping[str, Any]) -> tuple[Tensor, Tensor, int]:
    """Magnitude pruning (:func:`_magnitude`): no Hessian, no damping."""
    return _magnitude(w, sparsity), torch.zeros(w.shape[0], dtype=torch.float64), h.shape[-1]


def _solve(
    layers: Sequence[tuple[Tensor, Tensor, float]], method: str, options: Mapping[str, Any],
    progress: bool = False,
) -> list[tuple[Tensor, list[PruneInfo]]]:
    """Prune each ``(weight, hessians [S, n, n], sparsity)``; returns ``([S, *weight.shape],
    infos)`` per layer. The solver's time is shared among the layers in proportion to
    ``rows * n^2`` (their work in the column sweep) and divided by ``S``."""
    start = time.perf_counter()
    problems = []
    for weight, hessians, sparsity in layers:
        dtype = torch.promote_types(torch.promote_types(weight.dtype, hessians.dtype),
                                    torch.float32)
        h = hessians.to(weight.device, dtype)
        w = weight.detach().flatten(1).to(dtype).expand(h.shape[0], -1, -1)
        problems.append((w, h, tuple(weight.shape), sparsity))
    with tqdm(total=len(problems), desc="pruning layers", disable=not progress) as bar:
        solved = SOLVERS[method].run(problems, options, bar.update)
    for device in {w.device for w, _, _, _ in problems if w.is_cuda}:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    work = [w.shape[1] * w.shape[2] ** 2 for w, _, _, _ in problems]
    results = []
    for (weight, _, sparsity), (w, h, _, _), (out, damps, group), share in zip(
            layers, problems, solved, work, strict=True):
        S, n = h.shape[0], h.shape[-1]
        errors, refs = reconstruction_errors(w[0], out, h)
        zeros = (out == 0).flatten(1).sum(1).tolist()
        achieved = [z / out[0].numel() for z in zeros]
        budget, spared = _budgets(sparsity, w.shape[1], n, group)
        if sparsity > 0 and min(achieved) == 0:
            warnings.warn(f"{method} pruned no weight of a {tuple(weight.shape)} layer at "
                          f"sparsity {sparsity}: the per-group budget rounds to zero (use a "
                          "larger mask_group)", RuntimeWarning, stacklevel=3)
        each = seconds * share / max(sum(work), 1) / S
        infos = [PruneInfo(method, sparsity, achieved[s], float(damps[s]), errors[s],
                           _ratio(errors[s], refs[s]), each, out[0].numel(), budget,
                           int(zeros[s]), spared) for s in range(S)]
        results.append((out.reshape(S, *weight.shape).to(weight.dtype), infos))
    return results


def _ratio(error: float, ref: float) -> float:
    if ref > 0:
        return error / ref
    return 0.0 if error == 0 else math.inf


def reconstruction_errors(weight: Tensor, pruned: Tensor, hessians: Tensor) -> tuple[list, list]:
    """``tr(D H D^T)`` for ``D = weight - pruned`` and ``tr(W H W^T)``, per sample ``H[s]``."""
    w = weight.flatten(1).to(hessians.dtype).expand(hessians.shape[0], -1, -1)
    diff = w - pruned.flatten(2).to(hessians.dtype)
    err = ((diff @ hessians) * diff).sum((1, 2), dtype=torch.float64)
    ref = ((w @ hessians) * w).sum((1, 2), dtype=torch.float64)
    return err.tolist(), ref.tolist()


def _check_layer(weight: Tensor, hessian: Tensor, batched: bool) -> None:
    if not isinstance(weight, Tensor) or weight.dim() not in (2, 4):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a [out, in] or [out, in, kh, kw] tensor, got {shape}")
    n = weight.flatten(1).shape[1]
    want = (n, n) if not batched else (hessian.shape[0], n, n)
    if not isinstance(hessian, Tensor) or tuple(hessian.shape) != want or (
            batched and hessian.dim() != 3):
        got = tuple(hessian.shape) if isinstance(hessian, Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must have shape {list(want) if not batched else ['S', n, n]} "
                         f"to match weight {tuple(weight.shape)}, got {got}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or inf")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf")


def prune_layer(
    weight: Tensor, hessian: Tensor, sparsity: float, method: str = "fastobc", **options: Any,
) -> tuple[Tensor, PruneInfo]:
    """Prune one layer's weight to ``sparsity`` using its input Hessian.

    Parameters
    ----------
    weight
        ``[out, in]`` (Linear) or ``[out, in, kh, kw]`` (Conv2d). Not modified.
    hessian
        ``[n, n]`` with ``n = weight.flatten(1).shape[1]``, e.g. from :func:`layer_hessians`.
    sparsity
        Fraction of weights to remove, in ``[0, 1)`` (see the module notes on rounding).
    method
        A name in :data:`SOLVERS`: ``"fastobc"`` (default), ``"obc"``, ``"magnitude"`` or one
        added with :func:`register_solver`; an unknown name raises ``ValueError`` listing them.
    **options
        ``damp`` (fastobc, obc): relative damping, a fraction of the mean diagonal (0.01).
        ``mask_group`` (fastobc): columns per mask group; ``None`` is the paper's choice (``kh*kw``,
        one input channel of a conv; 1 for a linear layer), widened by whole input channels for
        layers with few rows (:func:`default_mask_group`); ``"row"`` one group for the whole row.
        ``block_size`` (fastobc): columns per lazy-update block (128); speed only.
        ``batch_bytes`` (obc): memory for the rows' inverse Hessians processed together
        (default :func:`obc_batch_bytes`); (fastobc) memory for the factors, weights and
        errors of the samples and layers solved together (2 GiB).

    Returns
    -------
    tuple
        The pruned weight (same shape, dtype and device) and a :class:`PruneInfo`.
    """
    sparsity = _check_sparsity(sparsity)
    check_method(method, options)
    _check_layer(weight, hessian, batched=False)
    [(out, infos)] = _solve([(weight, hessian[None], sparsity)], method, options)
    return out[0], infos[0]


def prune_layer_batch(
    weight: Tensor, hessians: Tensor, sparsity: float, method: str = "fastobc", **options: Any,
) -> tuple[Tensor, list[PruneInfo]]:
    """:func:`prune_layer` for one weight and ``S`` Hessians ``[S, n, n]`` (one per sample).

    The samples are solved together (batched Cholesky, batched column sweep), which is much
    faster than ``S`` separate calls where the solver is bound by per-step overhead (GPU).
    Returns ``[S, *weight.shape]`` and one :class:`PruneInfo` per sample (its ``seconds`` is the
    batch's time divided by ``S``).
    """
    sparsity = _check_sparsity(sparsity)
    check_method(method, options)
    _check_layer(weight, hessians, batched=True)
    return _solve([(weight, hessians, sparsity)], method, options)[0]


def prune_layers(
    layers: Mapping[str, tuple[Tensor, Tensor, float]], method: str = "fastobc", *,
    progress: bool = False, **options: Any,
) -> dict[str, tuple[Tensor, list[PruneInfo]]]:
    """:func:`prune_layer_batch` for several layers at once.

    Parameters
    ----------
    layers
        ``name -> (weight, hessians, sparsity)``: a weight ``[out, in]`` or ``[out, in, kh, kw]``,
        its ``S`` Hessians ``[S, n, n]`` (one per sample) and its target in ``[0, 1)``. Not
        modified.
    method, **options
        As for :func:`prune_layer`; ``batch_bytes`` (fastobc) bounds the memory of one batch of
        layers (2 GiB by default).
    progress
        Show a progress bar over the layers.

    Returns
    -------
    dict
        ``name -> (pruned [S, *weight.shape], [PruneInfo] * S)``, in the order of ``layers``.

    FastOBC solves the layers of equal width and mask group together, every sample of every
    layer in one batch (padded rows that never change), so the number of tensor operations
    grows with the number of distinct widths, not of layers or samples; the results are those
    of separate :func:`prune_layer` calls up to float rounding (and the choice among weights
    tied at a group's budget).
    Each :attr:`PruneInfo.seconds` is the call's time shared by ``rows * n^2``.
    """
    check_method(method, options)
    checked = []
    for name, item in layers.items():
        if not isinstance(item, tuple) or len(item) != 3:
            raise ValueError(f"layers[{name!r}] must be a (weight, hessians, sparsity) tuple, "
                             f"got {type(item).__name__}")
        weight, hessians, sparsity = item
        _check_layer(weight, hessians, batched=True)
        checked.append((weight, hessians, _check_sparsity(sparsity)))
    return dict(zip(layers, _solve(checked, method, options, progress), strict=True))
