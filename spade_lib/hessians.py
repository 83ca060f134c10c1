"""Layer input statistics for SPADE: the Hessians ``H = (2/N) X X^T`` of chosen layers' inputs.

A layer with weight ``W`` (``[out, in]``, or a conv weight flattened to ``[out, in*kh*kw]``) is
pruned by solving ``min ||W X - W_hat X||^2`` over a sparse ``W_hat`` (:mod:`spade_lib.pruning`),
where ``X`` holds the layer's inputs (a conv's inputs unfolded into columns,
:func:`conv_columns`). All a solver needs from ``X`` is ``H``, so :func:`layer_hessians` collects
it for every chosen layer in one pass over the data. For stride-1 zero-padded convs the Gram
matrix is built from shifted correlations of the input (:func:`_shift_gram`) where that takes
fewer flops than unfolding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_lib.schedules import get_layers

__all__ = ["conv_columns", "eval_mode", "layer_hessians"]


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
    modules = get_layers(model, layers)
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
