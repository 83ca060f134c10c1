"""SPADE traces: a copy of the network pruned for one input, with a per-layer report.

:func:`trace` augments the sample (:func:`augment`), collects every chosen layer's input Hessian
from the DENSE network on the augmented batch, prunes each layer to its target sparsity with an
OBS-family solver (:mod:`spade_lib.pruning`) and returns the pruned copy. The caller's network is
never changed. :func:`trace_batch` does the same for many samples with batched solves.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spade_lib import pruning

__all__ = ["RECIPES", "REPORT_COLUMNS", "Trace", "augment", "check_image", "trace",
           "trace_batch"]

RECIPES = ("default", "convnext")


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

def _uniform(n: int, low: float, high: float, gen: torch.Generator | None,
             device: torch.device) -> Tensor:
    gdev = gen.device if gen is not None else device
    return (torch.rand(n, generator=gen, device=gdev) * (high - low) + low).to(device)


def _crop_boxes(n: int, height: int, width: int, gen: torch.Generator | None,
                device: torch.device, scale: tuple[float, float] = (0.2, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> Tensor:
    """Integer boxes ``(top, left, h, w)`` drawn as torchvision's RandomResizedCrop does.

    Each sample draws ``tries`` (area, log-aspect) pairs at once and keeps the first box that fits;
    samples with none fall back to the central crop with the aspect clamped to ``ratio``.
    """
    area = height * width
    target = area * _uniform(n * tries, *scale, gen, device).view(n, tries)
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), gen, device))
    aspect = aspect.view(n, tries)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1)
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    ok = fits.any(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w, h = torch.where(ok, w, float(fw)), torch.where(ok, h, float(fh))
    u, v = _uniform(n, 0, 1, gen, device), _uniform(n, 0, 1, gen, device)
    top = torch.where(ok, torch.floor(u * (height - h + 1)), float((height - fh) // 2))
    left = torch.where(ok, torch.floor(v * (width - w + 1)), float((width - fw) // 2))
    return torch.stack([top, left, h, w], 1)


def _resized_crop(x: Tensor, boxes: Tensor, flip: Tensor) -> Tensor:
    """Crop boxes ``(top, left, h, w)`` of ``x`` ``[1, C, H, W]``, resize each to ``H x W``.

    Bilinear with ``align_corners=False`` and edge clamping inside the box, which equals resizing
    the cropped image (the crops are never larger than the image, so no antialiasing is needed);
    ``flip`` mirrors a copy horizontally. One ``grid_sample`` call for the whole batch.
    """
    n, (_, c, height, width) = boxes.shape[0], x.shape
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0) * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = torch.nn.functional.affine_grid(theta, [n, c, height, width], align_corners=False)
    for axis, start, size, full in ((0, left, w, width), (1, top, h, height)):
        low = ((2 * start + 1) / full - 1)[:, None, None]
        high = ((2 * (start + size) - 1) / full - 1)[:, None, None]
        grid[..., axis] = torch.minimum(torch.maximum(grid[..., axis], low), high)
    return torch.nn.functional.grid_sample(x.expand(n, -1, -1, -1), grid, mode="bilinear",
                                           padding_mode="border", align_corners=False)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.long) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in
                         [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)
    return table.gather(0, i[None, :, None].expand(1, -1, 3, *i.shape[1:]))[0]


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + shift[:, None, None]) % 1.0
    return _hsv_to_rgb(hsv)


def _erase_boxes(n: int, height: int, width: int, gen: torch.Generator | None,
                 device: torch.device, scale: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3), tries: int = 10) -> Tensor:
    """Boxes ``(top, left, h, w)`` as torchvision's RandomErasing draws them (``h = 0``: none)."""
    area = height * width
    target = area * _uniform(n * tries, *scale, gen, device).view(n, tries)
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), gen, device))
    aspect = aspect.view(n, tries)
    h = torch.round(torch.sqrt(target * aspect))
    w = torch.round(torch.sqrt(target / aspect))
    fits = (h < height) & (w < width)
    first = fits.to(torch.uint8).argmax(1)
    h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    ok = fits.any(1)
    h, w = torch.where(ok, h, 0.0), torch.where(ok, w, 0.0)
    u, v = _uniform(n, 0, 1, gen, device), _uniform(n, 0, 1, gen, device)
    top, left = torch.floor(u * (height - h + 1)), torch.floor(v * (width - w + 1))
    return torch.stack([top, left, h, w], 1)


def check_image(image: Any, dtype: torch.dtype | None = None) -> Tensor:
    """Check an image is ``[3, H, W]`` or ``[1, 3, H, W]`` and finite; return ``[3, H, W]``.

    ``dtype``: the model's floating dtype, which the image must then have.
    """
    if not isinstance(image, Tensor):
        raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3 or image.numel() == 0:
        raise ValueError(f"image must have shape [3, H, W] or [1, 3, H, W] with H, W >= 1, got "
                         f"{list(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a float tensor with values in [0, 1], got {image.dtype}")
    if dtype is not None and image.dtype != dtype:
        raise ValueError(f"image dtype {image.dtype} differs from the model's {dtype}; allowed: "
                         f"{dtype} (convert with image.to({dtype}))")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or inf values")
    return image


def augment(
    image: Tensor, n: int, recipe: str = "default",
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """``n`` augmented copies ``[n, 3, H, W]`` of ``image`` (the SPADE recipe), on its device.

    ``default``: RandomResizedCrop (scale 0.2-1, aspect 3/4-4/3, back to ``H x W``, bilinear),
    horizontal flip with p 0.5, ColorJitter (brightness 0.5, hue 0.3, in random order per copy).
    ``convnext`` (Table C.8) adds Gaussian noise of variance 0.001 (then clipped to [0, 1]) and
    RandomErasing (p 0.5, scale 0.02-0.33, ratio 0.3-3.3, value 0). All copies are made at once with
    tensor ops; the original image is not among them. ``generator`` (a ``torch.Generator`` or an
    int seed for one on the image's device) makes the batch reproducible.
    """
    image = check_image(image)
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of augmentations must be an int >= 1, got {n!r}")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator(device=image.device).manual_seed(generator)
    gen, dev = generator, image.device
    _, height, width = image.shape
    x = image[None].float()

    boxes = _crop_boxes(n, height, width, gen, dev)
    out = _resized_crop(x, boxes, _uniform(n, 0, 1, gen, dev) < 0.5)

    bright = _uniform(n, 0.5, 1.5, gen, dev)[:, None, None, None]
    hue = _uniform(n, -0.3, 0.3, gen, dev)
    hue_first = (_uniform(n, 0, 1, gen, dev) < 0.5)[:, None, None, None]
    out = _adjust_hue(torch.where(hue_first, out, (out * bright).clamp(0, 1)), hue)
    out = torch.where(hue_first, (out * bright).clamp(0, 1), out)

    if recipe == "convnext":
        gdev = gen.device if gen is not None else dev
        noise = torch.randn(out.shape, generator=gen, device=gdev).to(dev)
        out = (out + math.sqrt(0.001) * noise).clamp(0, 1)
        erase = _uniform(n, 0, 1, gen, dev) < 0.5
        top, left, h, w = _erase_boxes(n, height, width, gen, dev).unbind(1)
        h = torch.where(erase, h, 0.0)
        rows = torch.arange(height, device=dev)[None, :, None]
        cols = torch.arange(width, device=dev)[None, None, :]
        box = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
               & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
        out = out.masked_fill(box[:, None], 0.0)
    return out.to(image.dtype)


# --------------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------------

@dataclass
class Trace:
    """A network pruned for one sample.

    Attributes
    ----------
    model
        The pruned deep copy (eval mode); interpret the sample on it.
    report
        One row per pruned layer (:data:`REPORT_COLUMNS`): ``layer``, ``shape``, ``target`` and
        ``sparsity`` (achieved), ``rel_error`` (``||(W - W_hat) X||^2 / ||W X||^2`` on the
        augmented batch, from the Hessian), ``damp`` (relative damping used), ``seconds``
        (solver time), and the flags: ``excess`` (zero weights beyond the rounding of the target,
        e.g. inputs dead on every augmentation: the layer is above its target), ``spared``
        (weights kept because rounding may not empty a mask group) and ``empty`` (every weight
        zero). :func:`trace` warns (:class:`spade_lib.pruning.SparsityTargetWarning`) naming
        every layer with one of them.
    timings
        Seconds spent in ``augment``, ``hessians``, ``solve`` and ``total`` (per sample).
    """

    model: nn.Module
    report: pd.DataFrame
    timings: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Wall-clock seconds per phase, synchronising the device so GPU work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {"augment": 0.0, "hessians": 0.0, "solve": 0.0}

    def start(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def stop(self, phase: str, start: float) -> None:
        _sync(self.device)
        self.seconds[phase] += time.perf_counter() - start


def _augmented_batches(image: Tensor, n: int, recipe: str, batch_size: int,
                       gen: torch.Generator, clock: _Clock) -> Iterator[Tensor]:
    """Augmented copies in batches, generated lazily so memory stays bounded; timed."""
    for i in range(0, n, batch_size):
        t = clock.start()
        batch = augment(image, min(batch_size, n - i), recipe, gen)
        clock.stop("augment", t)
        yield batch


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters to prune") from None


def _dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (what its inputs must have)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _plan(model: nn.Module, sparsity: pruning.SparsitySpec, pruner: str,
          layers: Sequence[str] | str | None, n_augmentations: int, augment_recipe: str,
          batch_size: int, seed: int, options: dict[str, Any]) -> dict[str, float]:
    """Validate everything before work starts; returns the layers to prune and their targets."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    pruning.check_method(pruner, options)
    if augment_recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {augment_recipe!r}; "
                         f"valid: {', '.join(RECIPES)}")
    for name, value in (("n_augmentations", n_augmentations), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    chosen = None if layers is None else pruning.select_layers(model, layers)
    targets = pruning.resolve_sparsity(model, sparsity, chosen)
    return {name: s for name, s in targets.items() if s > 0}


REPORT_COLUMNS = ("layer", "shape", "target", "sparsity", "rel_error", "damp", "seconds",
                  "excess", "spared", "empty")
"""Columns of :attr:`Trace.report`."""


def _report(model: nn.Module, targets: dict[str, float],
            infos: dict[str, pruning.PruneInfo]) -> pd.DataFrame:
    modules = dict(model.named_modules())
    rows = [{"layer": name, "shape": tuple(modules[name].weight.shape), "target": targets[name],
             "sparsity": infos[name].sparsity, "rel_error": infos[name].rel_error,
             "damp": infos[name].damp, "seconds": infos[name].seconds,
             "excess": infos[name].excess, "spared": infos[name].spared,
             "empty": infos[name].empty} for name in targets]
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))


def _flagged(report: pd.DataFrame) -> list[str]:
    """One phrase per flagged layer of a report: empty, above target, or kept by rounding."""
    out = []
    for row in report.itertuples(index=False):
        if row.empty:
            out.append(f"{row.layer} is empty (every weight zero; target {row.target:g})")
        elif row.excess > 0:
            out.append(f"{row.layer} is above its target {row.target:g} by {row.excess} "
                       f"weights beyond rounding (sparsity {row.sparsity:.4f}; dead inputs)")
        elif row.spared > 0:
            out.append(f"{row.layer} keeps {row.spared} weights that rounding would remove, so "
                       f"that no group is emptied (sparsity {row.sparsity:.4f}, target "
                       f"{row.target:g})")
    return out


def _warn_flagged(reports: Sequence[pd.DataFrame]) -> None:
    """One :class:`spade_lib.pruning.SparsityTargetWarning` naming the flagged layers."""
    flags = [(i, f) for i, report in enumerate(reports) for f in _flagged(report)]
    if not flags:
        return
    many = len(reports) > 1
    text = "; ".join(f"sample {i}: {f}" if many else f for i, f in flags)
    warnings.warn(f"pruned layers off their target: {text}", pruning.SparsityTargetWarning,
                  stacklevel=3)


@torch.no_grad()
def trace(
    model: nn.Module,
    image: Tensor,
    sparsity: pruning.SparsitySpec = 0.9,
    pruner: str = "fastobc",
    n_augmentations: int = 1024,
    augment: str = "default",
    batch_size: int = 256,
    seed: int = 0,
    layers: Sequence[str] | str | None = None,
    sequential: bool = False,
    progress: bool = False,
    **pruner_options: Any,
) -> Trace:
    """Prune a copy of ``model`` for ``image`` (SPADE); the caller's model is not changed.

    Parameters
    ----------
    model
        The dense classifier. Its parameters stay bit-identical and its train/eval flags are kept;
        statistics are taken from a copy in eval mode.
    image
        ``[3, H, W]`` or ``[1, 3, H, W]``, float in [0, 1], finite.
    sparsity
        A float, a dict of layer names, :func:`spade_lib.pruning.linear`,
        :func:`spade_lib.pruning.only` or a config string; see
        :func:`spade_lib.pruning.resolve_sparsity`. Layers whose target is 0 are left as they are.
    pruner
        ``"fastobc"``, ``"obc"`` or ``"magnitude"``.
    n_augmentations, augment, batch_size, seed
        Size and recipe of the augmented batch, forward batch size, and the seed that makes the
        trace reproducible.
    layers
        Layer names or fnmatch patterns (default: :func:`spade_lib.pruning.default_layers`).
    sequential
        Recompute each layer's Hessian on the partially pruned copy (an ablation); by default all
        layers use the dense model's statistics, as in the paper.
    progress
        Show a progress bar over layers.
    **pruner_options
        Passed to :func:`spade_lib.pruning.prune_layer` (``damp``, ``mask_group``, ...).

    Returns
    -------
    Trace
        The pruned copy, its per-layer report and the timings.

    Warns
    -----
    spade_lib.pruning.SparsityTargetWarning
        Naming every layer that is empty, above its target beyond rounding (``excess``) or kept
        weights so that rounding does not empty a group (``spared``); see :attr:`Trace.report`.
    """
    targets = _plan(model, sparsity, pruner, layers, n_augmentations, augment, batch_size, seed,
                    pruner_options)
    image = check_image(image, _dtype(model))
    device = _device(model)
    image = image.to(device)
    clock = _Clock(device)
    begin = clock.start()
    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())

    def hessians(names: list[str]) -> dict[str, Tensor]:
        gen = torch.Generator(device=device).manual_seed(seed)
        batches = _augmented_batches(image, n_augmentations, augment, batch_size, gen, clock)
        t = clock.start()
        out = pruning.layer_hessians(pruned, batches, names)
        clock.stop("hessians", t)
        return out

    if not sequential and targets:
        stats = hessians(list(targets))
        clock.seconds["hessians"] -= clock.seconds["augment"]
    infos = {}
    for name in tqdm(targets, desc="pruning layers", disable=not progress):
        if sequential:
            before = clock.seconds["augment"]
            h = hessians([name])[name]
            clock.seconds["hessians"] -= clock.seconds["augment"] - before
        else:
            h = stats.pop(name)
        t = clock.start()
        weight = modules[name].weight
        new, infos[name] = pruning.prune_layer(weight, h, targets[name], pruner, **pruner_options)
        weight.copy_(new)
        clock.stop("solve", t)
    clock.seconds["total"] = time.perf_counter() - begin
    report = _report(pruned, targets, infos)
    _warn_flagged([report])
    return Trace(pruned, report, dict(clock.seconds))


@torch.no_grad()
def trace_batch(
    model: nn.Module,
    images: Tensor,
    sparsity: pruning.SparsitySpec = 0.9,
    pruner: str = "fastobc",
    n_augmentations: int = 1024,
    augment: str = "default",
    batch_size: int = 256,
    seed: int = 0,
    layers: Sequence[str] | str | None = None,
    progress: bool = False,
    **pruner_options: Any,
) -> list[Trace]:
    """:func:`trace` for several samples ``[S, 3, H, W]`` at once (independent layers).

    Each sample gets its own augmentations (seeded ``seed + i``, so sample ``i`` matches
    ``trace(model, images[i], seed=seed + i)`` up to float rounding) and its own Hessians; each
    layer is then solved for all samples together (batched Cholesky and column sweep), which
    raises throughput where the solver is bound by per-step overhead. Timings are per sample.
    """
    targets = _plan(model, sparsity, pruner, layers, n_augmentations, augment, batch_size, seed,
                    pruner_options)
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a [S, 3, H, W] tensor with S >= 1, got {shape}")
    for i, img in enumerate(images):
        try:
            check_image(img, _dtype(model))
        except ValueError as e:
            raise ValueError(f"images[{i}]: {e}") from None
    device = _device(model)
    images = images.to(device)
    samples = images.shape[0]
    clock = _Clock(device)
    begin = clock.start()
    dense = copy.deepcopy(model).eval()
    stats: dict[str, list[Tensor]] = {name: [] for name in targets}
    for i in range(samples):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        batches = _augmented_batches(images[i], n_augmentations, augment, batch_size, gen, clock)
        before = clock.seconds["augment"]
        t = clock.start()
        for name, h in pruning.layer_hessians(dense, batches, list(targets)).items():
            stats[name].append(h)
        clock.stop("hessians", t)
        clock.seconds["hessians"] -= clock.seconds["augment"] - before
    copies = [copy.deepcopy(dense) for _ in range(samples)]
    infos: list[dict[str, pruning.PruneInfo]] = [{} for _ in range(samples)]
    for name in tqdm(targets, desc="pruning layers", disable=not progress):
        t = clock.start()
        weight = dict(dense.named_modules())[name].weight
        new, layer_infos = pruning.prune_layer_batch(
            weight, torch.stack(stats.pop(name)), targets[name], pruner, **pruner_options)
        for i in range(samples):
            dict(copies[i].named_modules())[name].weight.copy_(new[i])
            infos[i][name] = layer_infos[i]
        clock.stop("solve", t)
    clock.seconds["total"] = time.perf_counter() - begin
    per_sample = {k: v / samples for k, v in clock.seconds.items()}
    reports = [_report(copies[i], targets, infos[i]) for i in range(samples)]
    _warn_flagged(reports)
    return [Trace(copies[i], reports[i], dict(per_sample)) for i in range(samples)]
