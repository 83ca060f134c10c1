"""Readable references the fast code is checked against (tests) and timed against (benchmarks).

:func:`fastobc_reference` is SparseGPT / FastOBC as published, one page, no speed-ups. The tests
compare :func:`spade_lib.pruning.prune_layer` with it; ``benchmarks/bench_trace.py`` uses it as
the baseline solver (it puts ``tests/`` on ``sys.path`` to import this module).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spade_lib.pruning import default_mask_group

__all__ = ["fastobc_reference"]


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
