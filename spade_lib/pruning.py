"""Layer-wise pruning for SPADE: input statistics, OBS-family solvers and sparsity schedules.

A layer with weight ``W`` (``[out, in]``, or a conv weight flattened to ``[out, in*kh*kw]``) is
pruned by solving the reconstruction problem ``min ||W X - W_hat X||^2`` over a sparse ``W_hat``,
where ``X`` holds the layer's inputs (a conv's inputs unfolded into columns). Everything a solver
needs from ``X`` is the Hessian ``H = (2/N) X X^T``, so :func:`layer_hessians` collects it once for
every chosen layer in one pass over the data and :func:`prune_layer` solves each layer from it.

Solvers (``method``):

``obc``
    Exact Optimal Brain Compression: per row, greedy OBS removals with rank-1 downdates of the
    row's inverse Hessian, and a global per-layer budget that assigns removals to rows by loss.
``fastobc``
    SparseGPT-style: one Cholesky factor of the damped inverse Hessian for the whole layer, columns
    swept left to right, mask chosen per group of columns, errors pushed onto later columns.
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

import contextlib
import fnmatch
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "METHODS", "LinearSchedule", "OnlyBlocks", "PruneInfo", "SparsitySpec",
    "SparsityTargetWarning", "check_method",
    "conv_columns", "default_layers", "default_mask_group", "eval_mode", "layer_hessians",
    "linear", "only",
    "prunable_layers", "prune_layer", "prune_layer_batch", "reconstruction_errors",
    "resolve_sparsity", "select_layers",
]

METHODS = ("fastobc", "obc", "magnitude")
OPTIONS = {
    "fastobc": ("damp", "mask_group", "block_size"),
    "obc": ("damp", "batch_bytes"),
    "magnitude": (),
}
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
# Layer statistics
# --------------------------------------------------------------------------------------------

def _is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _get_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Look up named Conv2d (``groups == 1``) / Linear modules, with a clear error otherwise."""
    if isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of names, not the string {layers!r}")
    named = dict(model.named_modules())
    valid = [n for n, m in named.items() if _is_prunable(m)]
    out = {}
    for name in layers:
        if name not in named or not _is_prunable(named[name]):
            what = ("unknown layer" if name not in named
                    else "layer is not a Conv2d (groups=1) or Linear")
            raise ValueError(f"{what}: {name!r}; valid layers: {', '.join(valid)}")
        out[name] = named[name]
    return out


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Amounts ``(left, right, top, bottom)`` by which ``conv`` pads its input."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        (th, tw) = total
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _pad_input(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``x`` padded the way ``conv`` pads it (any padding mode, ``"same"`` included)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, _conv_padding(conv), mode=mode)


def conv_columns(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Unfold a conv's input ``[B, C, H, W]`` into columns ``[B, C*kh*kw, L]``.

    Rows are in ``(c_in, kh, kw)`` order, matching ``conv.weight.flatten(1)``, so that
    ``conv(x) == weight.flatten(1) @ columns`` (plus bias) at each of the ``L`` output positions.
    """
    return F.unfold(_pad_input(conv, x), conv.kernel_size, dilation=conv.dilation,
                    stride=conv.stride)


def _tap_matrix(x: Tensor, taps: Sequence[tuple[int, int]], out_hw: tuple[int, int],
                stride: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """Patch entries ``[C * len(taps), B * Ho * Wo]`` of an already padded input ``x``.

    Rows are ``(c, tap)`` in order, columns ``(b, oy, ox)``: one gather of strided views straight
    into the layout the Gram product wants (no unfold plus transpose).
    """
    xt = x.transpose(0, 1)
    (ho, wo), (sh, sw), (dh, dw) = out_hw, stride, dilation
    views = [xt[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
             for i, j in taps]
    return torch.stack(views, 1).reshape(x.shape[1] * len(taps), -1)


def _window(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """``x[..., top:bottom, left:right]`` in image coordinates, zero outside the image."""
    h, w = x.shape[-2:]
    t, b, lo, r = max(top, 0), min(bottom, h), max(left, 0), min(right, w)
    return F.pad(x[..., t:b, lo:r], (lo - left, right - r, t - top, bottom - b))


def _ring(conv: nn.Conv2d, h: int, w: int) -> list[tuple[range, range, list[tuple[int, int]]]]:
    """Anchors that touch an ``h x w`` image but are not output positions of the stride-1 ``conv``.

    An anchor ``u`` (image coordinates) has the patch ``x[u + (i*dh, j*dw)]``. Anchors touching the
    image span ``[-eh, h) x [-ew, w)`` (``e`` the dilated kernel extent); the conv's outputs span
    ``[-pt, h + pb - eh) x [-pl, w + pr - ew)``. Returns the difference as strips (rows, cols) with
    the kernel taps ``(i, j)`` that can reach the image from there.
    """
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    eh, ew = dh * (kh - 1), dw * (kw - 1)
    pl, pr, pt, pb = _conv_padding(conv)
    y0, y1 = max(-pt, -eh), min(h + pb - eh, h)
    x0, x1 = max(-pl, -ew), min(w + pr - ew, w)
    y1, x1 = max(y0, y1), max(x0, x1)
    strips = [(range(-eh, y0), range(-ew, w)), (range(y1, h), range(-ew, w)),
              (range(y0, y1), range(-ew, x0)), (range(y0, y1), range(x1, w))]
    out = []
    for rows, cols in strips:
        if not rows or not cols:
            continue
        ti = [i for i in range(kh) if any(0 <= u + i * dh < h for u in rows)]
        tj = [j for j in range(kw) if any(0 <= v + j * dw < w for v in cols)]
        if ti and tj:
            out.append((rows, cols, [(i, j) for i in ti for j in tj]))
    return out


def _use_shift_gram(conv: nn.Conv2d, h: int, w: int, ho: int, wo: int) -> bool:
    """Whether :func:`_shift_gram` applies to ``conv`` and needs fewer flops than unfolding."""
    if conv.stride != (1, 1) or conv.padding_mode != "zeros":
        return False
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    c, k = conv.in_channels, conv.in_channels * kh * kw
    shifts = ((2 * kh - 1) * (2 * kw - 1) + 1) // 2
    cost = shifts * c * c * (h + dh * (kh - 1)) * (w + dw * (kw - 1))
    for rows, cols, taps in _ring(conv, h, w):
        cost += (c * len(taps)) ** 2 * len(rows) * len(cols)
    return cost < k * k * ho * wo


def _shift_gram(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``sum p p^T`` over the patches ``p`` of a stride-1 zero-padded conv, without unfolding.

    Summed over all anchors whose patch touches the image, block ``(a, b)`` (two kernel taps) is
    the image's correlation ``G`` at the shift ``b - a``. With ``e`` zeros between rows and
    between images (``e`` the kernel's extent), every ``G`` is one matrix product of the flattened
    input with a shifted view of itself, and ``G(-s) = G(s)^T``: about ``(2k-1)^2 / 2`` products
    of ``C x C`` instead of one of ``C k^2 x C k^2``. The anchors that are not output positions
    (a thin ring, :func:`_ring`) are then unfolded and subtracted.
    """
    b, c, h, w = x.shape
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    eh, ew = dh * (kh - 1), dw * (kw - 1)
    z = x.new_zeros(c, b, h + eh, w + ew)
    z[:, :, eh // 2:eh // 2 + h, ew // 2:ew // 2 + w] = x.transpose(0, 1)
    z = z.view(c, -1)
    n, wz = z.shape[1], w + ew
    cache: dict[int, Tensor] = {}

    def gram(s: int) -> Tensor:
        if s < 0:
            return gram(-s).T
        if s not in cache:
            cache[s] = z[:, :n - s] @ z[:, s:].T
        return cache[s]

    taps = [(i, j) for i in range(kh) for j in range(kw)]
    blocks = torch.stack([torch.stack([gram((i2 - i1) * dh * wz + (j2 - j1) * dw)
                                       for (i2, j2) in taps]) for (i1, j1) in taps])
    out = blocks.permute(2, 0, 3, 1).reshape(c * kh * kw, c * kh * kw)
    for rows, cols, sub in _ring(conv, h, w):
        window = _window(x, rows.start, rows.stop + eh, cols.start, cols.stop + ew)
        ring = _tap_matrix(window, sub, (len(rows), len(cols)), (1, 1), conv.dilation)
        idx = torch.tensor([ch * kh * kw + i * kw + j for ch in range(c) for i, j in sub],
                           device=x.device)
        out.index_put_((idx[:, None], idx[None, :]), -(ring @ ring.T), accumulate=True)
    return out


class _Accumulator:
    """Running ``sum x x^T`` and column count for one layer, in chunks of bounded size."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, chunk_size: int) -> None:
        self.module, self.dtype, self.chunk_size = module, dtype, chunk_size
        self.sum: Tensor | None = None
        self.count = 0

    def _add(self, gram: Tensor, count: int) -> None:
        if self.sum is None:
            self.sum = torch.zeros_like(gram)
        self.sum += gram
        self.count += count

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].detach().to(self.dtype)
        if isinstance(module, nn.Linear):
            x = x.reshape(-1, x.shape[-1])
            step = max(1, self.chunk_size // x.shape[1])
            for i in range(0, x.shape[0], step):
                self._add(x[i:i + step].T @ x[i:i + step], x[i:i + step].shape[0])
            return
        k = module.in_channels * math.prod(module.kernel_size)
        (h, w), (ho, wo) = x.shape[-2:], output.shape[-2:]
        step = max(1, self.chunk_size // (k * ho * wo))
        shift = _use_shift_gram(module, h, w, ho, wo)
        taps = [(i, j) for i in range(module.kernel_size[0]) for j in range(module.kernel_size[1])]
        for i in range(0, x.shape[0], step):
            chunk = x[i:i + step]
            if shift:
                self._add(_shift_gram(module, chunk), chunk.shape[0] * ho * wo)
            else:
                cols = _tap_matrix(_pad_input(module, chunk), taps, (ho, wo), module.stride,
                                   module.dilation)
                self._add(cols @ cols.T, cols.shape[1])


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, and restore each one's own flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def _as_batches(batches: Tensor | Iterable[Tensor], batch_size: int | None) -> Iterator[Tensor]:
    if isinstance(batches, Tensor):
        step = batches.shape[0] if batch_size is None else batch_size
        for i in range(0, batches.shape[0], step):
            yield batches[i:i + step]
        return
    for batch in batches:
        if not isinstance(batch, Tensor):
            raise TypeError(f"batches must hold tensors, got {type(batch).__name__}")
        yield batch


@torch.no_grad()
def layer_hessians(
    model: nn.Module,
    batches: Tensor | Iterable[Tensor],
    layers: Sequence[str],
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 2**24,
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """Hessians ``H = (2/N) sum x x^T`` of the inputs of the named layers, in one pass.

    Forward hooks on the named Conv2d/Linear modules collect the inputs while ``model`` runs (in
    eval mode, restored afterwards; hooks are removed also on error). A conv's input is unfolded
    into columns in ``(c_in, kh, kw)`` order honouring kernel, stride, padding and dilation; ``N``
    counts all columns (batch times output positions). Extra leading dims of a Linear's input are
    flattened into rows.

    Parameters
    ----------
    model
        The (dense) network; batches are moved to its device.
    batches
        A tensor (split into ``batch_size`` pieces) or an iterable of input tensors.
    layers
        Module names (as in ``model.named_modules()``) of Conv2d (``groups == 1``) or Linear layers.
    dtype
        Accumulation dtype (``torch.float64`` for extra accuracy).
    chunk_size
        At most this many elements of unfolded input are held at once per layer (at least one
        image), so memory stays bounded however large the batch is.
    batch_size
        Split size when ``batches`` is a tensor (``None``: one batch).

    Returns
    -------
    dict
        Layer name to ``[n, n]`` Hessian with ``n = weight.flatten(1).shape[1]``.
    """
    modules = _get_layers(model, layers)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    accs = {name: _Accumulator(m, dtype, chunk_size) for name, m in modules.items()}
    device = next(model.parameters()).device
    handles = []
    try:
        for name, m in modules.items():
            handles.append(m.register_forward_hook(accs[name]))
        with eval_mode(model):
            for batch in _as_batches(batches, batch_size):
                model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, acc in accs.items():
        if acc.sum is None:
            raise RuntimeError(f"layer {name!r} received no input while the model ran")
        out[name] = acc.sum.mul_(2.0 / acc.count)
    return out


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


def _check_sparsity(sparsity: Any, what: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{what} {sparsity!r} is outside the allowed range [0, 1)")
    return float(sparsity)


def check_method(method: str, options: Mapping[str, Any]) -> None:
    """Validate a solver name and its options (raises ``ValueError`` naming what is allowed)."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid methods: {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(OPTIONS[method]))
    if unknown:
        allowed = ", ".join(OPTIONS[method]) or "none"
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


def _tril_inverse(low: Tensor) -> Tensor:
    """Inverse of lower-triangular matrices ``[..., n, n]`` by 2x2 blocks (``n^3 / 3`` flops)."""
    n = low.shape[-1]
    if n <= 128:
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


def _fastobc(w: Tensor, u: Tensor, sparsity: float, group: int, block: int) -> Tensor:
    """SparseGPT sweep over columns, batched over samples.

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


def _obc(w: Tensor, hd: Tensor, hinv: Tensor, sparsity: float, batch_bytes: int) -> Tensor:
    """Exact OBC for one layer: ``w`` ``[rows, n]``, damped ``hd`` and its inverse ``hinv``.

    Pass 1 runs the greedy OBS removal to the end for every row (rows batched, each with its own
    copy of ``H^-1``, rank-1 downdated after each removal) and keeps only the removal order and
    the loss of each step. The budget then gives each row its number of removals: the loss
    increments of a row are taken in order, and the layer takes the globally cheapest ones, a
    row's next increment costing the largest increment so far (a heap greedy over rows). Pass 2
    rebuilds each row's weights for its pruned set with the optimal least-squares compensation
    ``w_K += H_KK^-1 H_KP w_P``, which is what the sequential OBS updates arrive at.
    """
    rows, n = w.shape
    order = torch.empty(rows, n, dtype=torch.long, device=w.device)
    losses = torch.empty(rows, n, dtype=w.dtype, device=w.device)
    step = max(1, batch_bytes // (n * n * w.element_size()))
    for r1 in range(0, rows, step):
        r2 = min(r1 + step, rows)
        wr, hi = w[r1:r2].clone(), hinv.expand(r2 - r1, n, n).clone()
        done = torch.zeros_like(wr, dtype=torch.bool)
        ar = torch.arange(r2 - r1, device=w.device)
        for t in range(n):
            diag = hi.diagonal(dim1=1, dim2=2)
            scores = (wr**2 / diag).masked_fill_(done, math.inf)
            j = scores.argmin(1)
            losses[r1:r2, t], order[r1:r2, t] = scores[ar, j], j
            col = hi[ar, :, j]                           # [b, n]: column j of each row's H^-1
            dj = col[ar, j].clone()
            wr.sub_(col * (wr[ar, j] / dj)[:, None])
            hi.sub_(col[:, :, None] * (col / dj[:, None])[:, None, :])
            done[ar, j] = True
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


def _solve(
    weight: Tensor, hessians: Tensor, sparsity: float, method: str, options: Mapping[str, Any],
) -> tuple[Tensor, list[PruneInfo]]:
    """Prune ``weight`` for each of the Hessians ``[S, n, n]``; returns ``[S, *weight.shape]``."""
    start = time.perf_counter()
    dtype = torch.promote_types(torch.promote_types(weight.dtype, hessians.dtype), torch.float32)
    h = hessians.to(weight.device, dtype)
    S, n = h.shape[0], h.shape[-1]
    w = weight.detach().flatten(1).to(dtype).expand(S, -1, -1)
    damps = torch.zeros(S, dtype=torch.float64)
    group = n
    if method == "magnitude":
        out = _magnitude(w, sparsity)
    else:
        w, hclean = _drop_dead(w, h)
        damp = float(options.get("damp", 0.01))
        if method == "fastobc":
            group = options.get("mask_group")
            if group is None:
                group = default_mask_group(weight.shape)
            group = n if group == "row" else min(group, n)
            _, u, damps = _damped_inverse(hclean, damp, upper=True)
            out = _fastobc(w, u, sparsity, group, options.get("block_size", 128))
        else:
            hd, hinv, damps = _damped_inverse(hclean, damp, upper=False)
            default_bytes = 2**31 if w.is_cuda else 2**28
            out = torch.stack([
                _obc(w[s], hd[s], hinv[s], sparsity, options.get("batch_bytes", default_bytes))
                for s in range(S)])
    if w.is_cuda:
        torch.cuda.synchronize(w.device)
    seconds = (time.perf_counter() - start) / S
    errors, refs = reconstruction_errors(weight.detach().flatten(1).to(dtype), out, h)
    zeros = (out == 0).flatten(1).sum(1).tolist()
    achieved = [z / out[0].numel() for z in zeros]
    budget, spared = _budgets(sparsity, w.shape[1], n, group)
    if sparsity > 0 and min(achieved) == 0:
        warnings.warn(f"{method} pruned no weight of a {tuple(weight.shape)} layer at sparsity "
                      f"{sparsity}: the per-group budget rounds to zero (use a larger mask_group)",
                      RuntimeWarning, stacklevel=3)
    infos = [
        PruneInfo(method, sparsity, achieved[s], float(damps[s]), errors[s],
                  _ratio(errors[s], refs[s]), seconds, out[0].numel(), budget, int(zeros[s]),
                  spared)
        for s in range(S)]
    return out.reshape(S, *weight.shape).to(weight.dtype), infos


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
        ``"fastobc"`` (default), ``"obc"`` or ``"magnitude"``.
    **options
        ``damp`` (fastobc, obc): relative damping, a fraction of the mean diagonal (0.01).
        ``mask_group`` (fastobc): columns per mask group; ``None`` is the paper's choice (``kh*kw``,
        one input channel of a conv; 1 for a linear layer), widened by whole input channels for
        layers with few rows (:func:`default_mask_group`); ``"row"`` one group for the whole row.
        ``block_size`` (fastobc): columns per lazy-update block (128); speed only.
        ``batch_bytes`` (obc): memory for the rows' inverse Hessians processed together.

    Returns
    -------
    tuple
        The pruned weight (same shape, dtype and device) and a :class:`PruneInfo`.
    """
    sparsity = _check_sparsity(sparsity)
    check_method(method, options)
    _check_layer(weight, hessian, batched=False)
    out, infos = _solve(weight, hessian[None], sparsity, method, options)
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
    return _solve(weight, hessians, sparsity, method, options)


# --------------------------------------------------------------------------------------------
# Layer choice and sparsity schedules
# --------------------------------------------------------------------------------------------

def prunable_layers(model: nn.Module) -> list[str]:
    """Names of all Conv2d (``groups == 1``) and Linear modules, in module order."""
    return [name for name, m in model.named_modules() if _is_prunable(m)]


def default_layers(model: nn.Module) -> list[str]:
    """The paper's default: every Conv2d and Linear except the stem and grouped convs.

    The stem is the first Conv2d in module order; depthwise and other grouped convs are skipped.
    """
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    stem = convs[0] if convs else None
    return [name for name in prunable_layers(model) if name != stem]


def select_layers(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Prunable layers whose names match any of the fnmatch-style ``patterns``, in module order.

    A pattern that matches no prunable layer is an error that lists the valid names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    valid = prunable_layers(model)
    if not isinstance(patterns, Iterable) or not (patterns := list(patterns)):
        raise ValueError(f"layers must be a name or pattern, or a non-empty sequence of them, got "
                         f"{patterns!r}; valid layers: {', '.join(valid)}")
    for p in patterns:
        if not isinstance(p, str) or not fnmatch.filter(valid, p):
            raise ValueError(f"layer pattern {p!r} matches no Conv2d (groups=1) or Linear layer; "
                             f"valid layers: {', '.join(valid)}")
    return [name for name in valid if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


@dataclass(frozen=True)
class LinearSchedule:
    """Sparsity rising linearly from ``first`` (first pruned layer) to ``last`` (last one)."""

    first: float = 0.0
    last: float = 0.99


@dataclass(frozen=True)
class OnlyBlocks:
    """Prune only the layers under the given name prefixes (Table D.13); the others stay dense."""

    blocks: tuple[str, ...]
    sparsity: float


SparsitySpec = float | Mapping[str, float] | LinearSchedule | OnlyBlocks | str


def linear(first: float = 0.0, last: float = 0.99) -> LinearSchedule:
    """The paper's linear schedule over the pruned layers in network order (0 to 0.99)."""
    return LinearSchedule(_check_sparsity(first, "first"), _check_sparsity(last, "last"))


def only(blocks: str | Sequence[str], sparsity: float) -> OnlyBlocks:
    """Prune only layers whose names are, or start with, ``block + "."`` for a given block."""
    blocks = (blocks,) if isinstance(blocks, str) else tuple(blocks)
    if not blocks:
        raise ValueError("only() needs at least one block name prefix")
    return OnlyBlocks(blocks, _check_sparsity(sparsity))


def _parse_spec(spec: str) -> SparsitySpec:
    """Parse the config strings ``linear``, ``linear:FIRST:LAST`` and ``only:P[,P...]:S``."""
    parts = spec.split(":")
    try:
        if parts[0] == "linear" and len(parts) == 1:
            return linear()
        if parts[0] == "linear" and len(parts) == 3:
            return linear(float(parts[1]), float(parts[2]))
        if parts[0] == "only" and len(parts) == 3 and parts[1]:
            return only(parts[1].split(","), float(parts[2]))
    except ValueError as e:
        raise ValueError(f"bad sparsity spec {spec!r}: {e}") from None
    raise ValueError(f"unknown sparsity spec {spec!r}; allowed: a float in [0, 1), 'linear', "
                     "'linear:FIRST:LAST', 'only:PREFIX[,PREFIX...]:S', a dict, linear(), only()")


def resolve_sparsity(
    model: nn.Module, spec: SparsitySpec, layers: Sequence[str] | None = None,
) -> dict[str, float]:
    """Per-layer target sparsity for ``layers`` (default :func:`default_layers`), in order.

    ``spec`` is a float (every layer), a dict whose keys are layer names or block prefixes (a
    layer takes the value of the longest key it equals or starts with followed by a dot, e.g.
    ``{"layers.3": 0.9, "fc": 0.9}``; layers no key covers get 0, i.e. stay dense; a key covering
    no layer is an error listing the valid ones), :func:`linear`,
    :func:`only` or one of the config strings ``"linear"``, ``"linear:FIRST:LAST"``,
    ``"only:PREFIX[,PREFIX...]:S"``. With a single layer, ``linear`` gives it ``last``.
    """
    layers = default_layers(model) if layers is None else list(layers)
    _get_layers(model, layers)
    if isinstance(spec, str):
        spec = _parse_spec(spec)
    if isinstance(spec, LinearSchedule):
        n = len(layers)
        step = (spec.last - spec.first) / (n - 1) if n > 1 else 0.0
        start = spec.first if n > 1 else spec.last
        return {name: start + step * i for i, name in enumerate(layers)}
    if isinstance(spec, OnlyBlocks):
        for b in spec.blocks:
            if not any(name == b or name.startswith(b + ".") for name in layers):
                raise ValueError(f"block {b!r} contains none of the pruned layers; "
                                 f"valid layers: {', '.join(layers)}")
        return {name: spec.sparsity if any(name == b or name.startswith(b + ".")
                                           for b in spec.blocks) else 0.0 for name in layers}
    if isinstance(spec, Mapping):
        def covers(key: str, name: str) -> bool:
            return name == key or name.startswith(key + ".")

        unknown = [k for k in spec if not isinstance(k, str)
                   or not any(covers(k, name) for name in layers)]
        if unknown:
            raise ValueError(f"unknown layer(s) in sparsity dict: {', '.join(map(repr, unknown))}; "
                             f"keys are layer names or block prefixes of: {', '.join(layers)}")
        out = {}
        for name in layers:
            hits = [k for k in spec if covers(k, name)]
            key = max(hits, key=len) if hits else None
            out[name] = 0.0 if key is None else _check_sparsity(spec[key], f"sparsity of {key!r}")
        return out
    value = _check_sparsity(spec)
    return dict.fromkeys(layers, value)
