"""Readable references the fast code is checked against (tests) and timed against (benchmarks).

:func:`fastobc_reference` is SparseGPT / FastOBC as published, one page, no speed-ups. The tests
compare :func:`spade_lib.pruning.prune_layer` with it; ``benchmarks/bench_trace.py`` uses it as
the baseline solver (it puts ``tests/`` on ``sys.path`` to import this module).

:func:`fastobc_columns` is the library's FastOBC solver as it was until 2026-12 (lazy blocks,
samples batched, one layer at a time, every column of a mask group swept on its own): the
baseline of ``benchmarks/bench_solver.py`` and of the tests of the batched solver.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spade_lib.pruning import (
    _budget,
    _damped_inverse,
    _drop_dead,
    _lazy_blocks,
    _select_smallest,
    default_mask_group,
)

__all__ = ["fastobc_columns", "fastobc_reference", "solve_columns"]


def fastobc_reference(
    weight: Tensor, hessian: Tensor, sparsity: float, mask_group: int | str | None = None,
    damp: float = 0.01,
) -> Tensor:
    """SparseGPT / FastOBC as published: one column at a time, every later column updated.

    Dead inputs get a unit diagonal and zero weights; ``H`` is damped by ``damp`` times its mean
    diagonal; ``U`` is the upper Cholesky factor of ``H^-1``. At the first column of each group
    of ``mask_group`` columns (default :func:`spade_lib.pruning.default_mask_group`: ``kh*kw``, 1
    for linear, widened for layers with few rows; ``"row"``: the whole row), the
    ``round(sparsity * rows * group)`` smallest ``w^2 / U_jj^2`` of the group are masked; then
    each column's error ``(w_j - q_j) / U_jj`` is subtracted from all later columns.
    """
    w = weight.detach().flatten(1).clone().to(torch.promote_types(weight.dtype, torch.float32))
    h = hessian.detach().clone().to(w.dtype)
    rows, n = w.shape
    group = default_mask_group(weight.shape) if mask_group is None else mask_group
    group = n if group == "row" else group
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype, device=h.device)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(hinv, upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for j in range(n):
        if j % group == 0:
            g = slice(j, min(j + group, n))
            scores = (w[:, g] / u.diagonal()[g]) ** 2
            count = math.floor(sparsity * scores.numel() + 0.5)
            chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=w.device)
            chosen[scores.flatten().argsort()[:count]] = True
            mask[:, g] = chosen.view_as(scores)
        q = torch.where(mask[:, j], 0.0, w[:, j])
        err = (w[:, j] - q) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
        w[:, j] = q
    return w.view_as(weight).to(weight.dtype)


def fastobc_columns(weight: Tensor, hessians: Tensor, sparsity: float,
                    mask_group: int | str | None = None, damp: float = 0.01,
                    block: int = 128) -> Tensor:
    """The column-by-column FastOBC solver the library had before the batched one, for one
    layer and ``S`` Hessians ``[S, n, n]``; returns ``[S, *weight.shape]``."""
    dtype = torch.promote_types(torch.promote_types(weight.dtype, hessians.dtype),
                                torch.float32)
    h = hessians.to(weight.device, dtype)
    w = weight.detach().flatten(1).to(dtype).expand(h.shape[0], -1, -1)
    options = {"mask_group": mask_group, "damp": damp, "block_size": block}
    out, _, _ = solve_columns(w, h, tuple(weight.shape), sparsity, options)
    return out.reshape(h.shape[0], *weight.shape).to(weight.dtype)


def solve_columns(w: Tensor, h: Tensor, shape: tuple[int, ...], sparsity: float,
                  options: dict) -> tuple[Tensor, Tensor, int]:
    """:func:`fastobc_columns` as a solve function for :func:`spade_lib.pruning.register_solver`
    (the benchmark registers it as ``"fastobc-columns"``, so that both solvers do the same
    reporting work)."""
    n = h.shape[-1]
    group = options.get("mask_group")
    group = default_mask_group(shape) if group is None else group
    group = n if group == "row" else min(group, n)
    w, hclean = _drop_dead(w, h)
    _, u, damps = _damped_inverse(hclean, options.get("damp", 0.01), upper=True)
    return _column_sweep(w, u, sparsity, group, options.get("block_size", 128)), damps, group


def _column_sweep(w: Tensor, u: Tensor, sparsity: float, group: int, block: int) -> Tensor:
    """SparseGPT sweep over columns, batched over samples (the solver of 2026-11).

    ``w`` is ``[S, rows, n]`` and ``u`` ``[S, n, n]`` the upper Cholesky factor of the damped
    inverse Hessian. At the start of each group of ``group`` columns the group's mask is chosen by
    ``w^2 / U_jj^2`` over all rows; each column's error ``(w_j - w_hat_j) / U_jj`` is pushed onto
    the later columns with row ``j`` of ``U``. Updates inside a block of columns are applied at
    once; the rest of the layer gets the block's errors in one matrix product (lazy batching),
    which gives the same result as updating every later column after every column.
    """
    S, rows, n = w.shape
    wt = w.transpose(1, 2).contiguous()          # [S, n, rows]: one column per contiguous row
    dinv = 1 / u.diagonal(dim1=-2, dim2=-1)      # [S, n]
    scale = torch.zeros_like(wt)                 # pruned / U_jj, so that err_j = w_j * scale_j
    for i1, i2 in _lazy_blocks(n, group, block):
        err = torch.empty(S, i2 - i1, rows, dtype=w.dtype, device=w.device)
        for j in range(i1, i2):
            if j % group == 0:
                g = slice(j, min(j + group, n))
                scores = wt[:, g].abs() * dinv[:, g, None]      # same order as w^2 / U_jj^2
                mask = _select_smallest(scores, _budget(sparsity, scores[0].numel()))
                torch.mul(mask, dinv[:, g, None], out=scale[:, g])
            torch.mul(wt[:, j], scale[:, j], out=err[:, j - i1])
            if j + 1 < i2:
                wt[:, j + 1:i2].baddbmm_(u[:, j, j + 1:i2, None], err[:, j - i1, None], alpha=-1)
        if i2 < n:
            wt[:, i2:].baddbmm_(u[:, i1:i2, i2:].transpose(1, 2), err, alpha=-1)
    return wt.masked_fill_(scale != 0, 0.0).transpose(1, 2)
