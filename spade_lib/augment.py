"""Augmented views of one image: the SPADE recipes and the batches every trace draws.

:func:`augment` makes ``n`` augmented copies of an image with tensor ops (``"default"``: the
paper's RandomResizedCrop, flip and ColorJitter; ``"convnext"``: plus Gaussian noise and
RandomErasing, Table C.8; or any ``+`` combination of the components J, G, RC and RR of Table
D.12, such as ``"J+G+RC"``). :func:`augmented_batches` is the one generator of the batches a trace
sees for a seed: :func:`spade_lib.trace.trace`, :func:`spade_lib.trace.trace_batch` and the
sparsity search (:class:`spade_lib.search.Candidates`) all draw their views from it, so the same
seed gives the same views everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from spade_lib.checks import check_image

__all__ = ["COMPONENTS", "RECIPES", "augment", "augmented_batches", "check_image",
           "check_recipe", "recipe_components"]

COMPONENTS = {
    "RC": "random resized crop (scale 0.2-1, aspect 3/4-4/3) with a horizontal flip (p 0.5)",
    "J": "colour jitter (brightness 0.5, hue 0.3, in random order)",
    "G": "Gaussian noise of variance 0.001, clipped to [0, 1]",
    "RR": "random removal (RandomErasing p 0.5, scale 0.02-0.33, ratio 0.3-3.3, value 0)",
}
"""The augmentations of Table C.8 by the abbreviations of Table D.12, in the order they are
applied (and drawn from the generator)."""

RECIPES = ("default", "convnext")
"""Named augmentation recipes: the paper's ``"default"`` (J+RC) and ``"convnext"`` (J+G+RC+RR,
Table C.8). Any ``+`` combination of :data:`COMPONENTS` is a recipe too."""

_NAMED = {"default": ("RC", "J"), "convnext": ("RC", "J", "G", "RR")}


def recipe_components(recipe: str) -> tuple[str, ...]:
    """The components of an augmentation recipe, in the order they are applied.

    Parameters
    ----------
    recipe
        A name of :data:`RECIPES` or a ``+`` combination of :data:`COMPONENTS` in any order
        (``"J+RC"``, ``"RR+RC"``, ``"G"``), each at most once.

    Raises
    ------
    ValueError
        Naming the recipe and what is allowed.
    """
    if isinstance(recipe, str) and recipe in _NAMED:
        return _NAMED[recipe]
    parts = recipe.split("+") if isinstance(recipe, str) and recipe else []
    if not parts or any(p not in COMPONENTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"unknown augmentation recipe {recipe!r}; valid: "
                         f"{', '.join(RECIPES)}, or a '+' combination of "
                         f"{', '.join(COMPONENTS)} each at most once (e.g. 'J+G+RC')")
    return tuple(c for c in COMPONENTS if c in parts)


def check_recipe(recipe: str) -> str:
    """``recipe`` unchanged if :func:`recipe_components` accepts it, else its ValueError."""
    recipe_components(recipe)
    return recipe


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None,
             device: torch.device) -> Tensor:
    gdev = gen.device if gen is not None else device
    return (torch.rand(n, generator=gen, device=gdev) * (high - low) + low).to(device)


def _box_sides(n: int, tries: int, area: int, scale: tuple[float, float],
               ratio: tuple[float, float], gen: torch.Generator | None,
               device: torch.device) -> tuple[Tensor, Tensor]:
    """``tries`` candidate box sides per sample, ``[n, tries]`` each, as torchvision draws them:
    an area share uniform in ``scale`` and a log-uniform aspect in ``ratio``; returns the rounded
    ``sqrt(area * aspect)`` and ``sqrt(area / aspect)`` (which is width and which height is the
    caller's: RandomResizedCrop and RandomErasing differ)."""
    target = area * _uniform(n * tries, *scale, gen, device).view(n, tries)
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), gen, device))
    aspect = aspect.view(n, tries)
    return torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))


def _crop_boxes(n: int, height: int, width: int, gen: torch.Generator | None,
                device: torch.device, scale: tuple[float, float] = (0.2, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> Tensor:
    """Integer boxes ``(top, left, h, w)`` drawn as torchvision's RandomResizedCrop does.

    Each sample draws ``tries`` (area, log-aspect) pairs at once and keeps the first box that fits;
    samples with none fall back to the central crop with the aspect clamped to ``ratio``.
    """
    w, h = _box_sides(n, tries, height * width, scale, ratio, gen, device)
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
    h, w = _box_sides(n, tries, height * width, scale, ratio, gen, device)
    fits = (h < height) & (w < width)
    first = fits.to(torch.uint8).argmax(1)
    h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
    ok = fits.any(1)
    h, w = torch.where(ok, h, 0.0), torch.where(ok, w, 0.0)
    u, v = _uniform(n, 0, 1, gen, device), _uniform(n, 0, 1, gen, device)
    top, left = torch.floor(u * (height - h + 1)), torch.floor(v * (width - w + 1))
    return torch.stack([top, left, h, w], 1)


def augment(
    image: Tensor, n: int, recipe: str = "default",
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """``n`` augmented copies ``[n, 3, H, W]`` of ``image`` (the SPADE recipe), on its device.

    ``default``: RandomResizedCrop (scale 0.2-1, aspect 3/4-4/3, back to ``H x W``, bilinear),
    horizontal flip with p 0.5, ColorJitter (brightness 0.5, hue 0.3, in random order per copy).
    ``convnext`` (Table C.8) adds Gaussian noise of variance 0.001 (then clipped to [0, 1]) and
    RandomErasing (p 0.5, scale 0.02-0.33, ratio 0.3-3.3, value 0). A ``+`` combination of
    :data:`COMPONENTS` (Table D.12: ``"J+RC"`` is ``default``, ``"RR"``, ``"G+RC"``, ...) applies
    just those, in the order of :data:`COMPONENTS`; a component that is left out draws nothing
    from the generator. All copies are made at once with tensor ops; the original image is not
    among them (except, for ``"G"`` alone, up to the noise). ``generator`` (a ``torch.Generator``
    or an int seed for one on the image's device) makes the batch reproducible.
    """
    image = check_image(image)
    parts = recipe_components(recipe)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of augmentations must be an int >= 1, got {n!r}")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator(device=image.device).manual_seed(generator)
    gen, dev = generator, image.device
    _, height, width = image.shape
    x = image[None].float()

    out = x.expand(n, -1, -1, -1)
    if "RC" in parts:
        boxes = _crop_boxes(n, height, width, gen, dev)
        out = _resized_crop(x, boxes, _uniform(n, 0, 1, gen, dev) < 0.5)
    if "J" in parts:
        bright = _uniform(n, 0.5, 1.5, gen, dev)[:, None, None, None]
        hue = _uniform(n, -0.3, 0.3, gen, dev)
        hue_first = (_uniform(n, 0, 1, gen, dev) < 0.5)[:, None, None, None]
        out = _adjust_hue(torch.where(hue_first, out, (out * bright).clamp(0, 1)), hue)
        out = torch.where(hue_first, (out * bright).clamp(0, 1), out)
    if "G" in parts:
        gdev = gen.device if gen is not None else dev
        noise = torch.randn(out.shape, generator=gen, device=gdev).to(dev)
        out = (out + math.sqrt(0.001) * noise).clamp(0, 1)
    if "RR" in parts:
        erase = _uniform(n, 0, 1, gen, dev) < 0.5
        top, left, h, w = _erase_boxes(n, height, width, gen, dev).unbind(1)
        h = torch.where(erase, h, 0.0)
        rows = torch.arange(height, device=dev)[None, :, None]
        cols = torch.arange(width, device=dev)[None, None, :]
        box = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
               & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
        out = out.masked_fill(box[:, None], 0.0)
    return out.to(image.dtype)


def augmented_batches(image: Tensor, n: int, recipe: str = "default", seed: int = 0,
                      batch_size: int = 256) -> Iterator[Tensor]:
    """The ``n`` augmented copies of ``image`` a trace draws for ``seed``, in batches.

    One generator on the image's device, seeded with ``seed``, makes batches of ``batch_size``
    copies (the last one smaller) with :func:`augment`; they are made lazily, so memory stays
    bounded by one batch. Traces and the sparsity search draw their views here, which is what
    makes their statistics for the same seed identical.

    Parameters
    ----------
    image
        ``[3, H, W]`` or ``[1, 3, H, W]``, float in [0, 1].
    n, recipe, seed, batch_size
        Number of copies, recipe (:data:`RECIPES` or a combination, see
        :func:`recipe_components`), seed and batch size (both ints >= 1).

    Yields
    ------
    Tensor
        ``[min(batch_size, remaining), 3, H, W]`` on the image's device, in its dtype.
    """
    gen = torch.Generator(device=image.device).manual_seed(seed)
    for i in range(0, n, batch_size):
        yield augment(image, min(batch_size, n - i), recipe, gen)
