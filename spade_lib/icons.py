"""Trojan icons drawn by code: ten shapes as anti-aliased alpha maps of any size.

Each icon is an inside test on normalised coordinates (:data:`ICONS`), rasterised on a finer grid
and box-filtered down (:func:`draw_icon`), so edges are smooth at any size. The Trojan rules of
:mod:`spade_lib.trojan` paste them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from spade_lib.checks import check_positive_int

__all__ = ["ICONS", "check_icon", "draw_icon", "icon_names"]


def _polygon(x: np.ndarray, y: np.ndarray, points: Sequence[tuple[float, float]]) -> np.ndarray:
    """Inside test for a polygon (even-odd rule), vectorised over the grid ``x, y``."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(points)
    for i in range(n):
        x0, y0 = points[i]
        x1, y1 = points[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_at)
    return inside


def _disc(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return (x - cx) ** 2 + (y - cy) ** 2 <= r**2


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    outer, inner, cy = 1.0, 0.42, 0.08
    points = []
    for k in range(10):
        r = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((r * math.cos(angle), cy + r * math.sin(angle)))
    return _polygon(x, y, points)


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    u = x * 1.22
    v = -(y * 1.22) + 0.15
    return (u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0


def _smiley(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    face = _disc(x, y, 0.0, 0.0, 0.95)
    eyes = _disc(x, y, -0.33, -0.3, 0.14) | _disc(x, y, 0.33, -0.3, 0.14)
    r = np.sqrt(x**2 + (y + 0.05) ** 2)
    mouth = (r >= 0.48) & (r <= 0.64) & (y > 0.12)
    return face & ~eyes & ~mouth


def _fish(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    body = ((x + 0.2) / 0.68) ** 2 + (y / 0.5) ** 2 <= 1
    tail = _polygon(x, y, [(0.3, 0.0), (0.95, -0.55), (0.8, 0.0), (0.95, 0.55)])
    eye = _disc(x, y, -0.52, -0.1, 0.09)
    return (body | tail) & ~eye


def _flag(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    pole = (x >= -0.82) & (x <= -0.62) & (np.abs(y) <= 0.95)
    cloth = _polygon(x, y, [(-0.65, -0.95), (0.92, -0.48), (-0.65, 0.0)])
    return pole | cloth


def _cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    arm, length = 0.2, 0.95
    return ((np.abs(x) <= arm) & (np.abs(y) <= length)) | (
        (np.abs(y) <= arm) & (np.abs(x) <= length)
    )


def _moon(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _disc(x, y, 0.0, 0.0, 0.92) & ~_disc(x, y, 0.42, -0.22, 0.74)


def _lightning(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    points = [
        (0.15, -0.98),
        (-0.55, 0.12),
        (-0.06, 0.12),
        (-0.3, 0.98),
        (0.58, -0.18),
        (0.08, -0.18),
        (0.5, -0.98),
    ]
    return _polygon(x, y, points)


def _strawberry(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    t = np.clip((y + 0.4) / 1.38, 0.0, 1.0)
    half_width = 0.7 * np.sqrt(np.clip(1.0 - t**1.5, 0.0, 1.0)) * (1.0 - 0.4 * t)
    body = (y >= -0.4) & (y <= 0.98) & (np.abs(x) <= half_width)
    top = ((x / 0.7) ** 2 + ((y + 0.4) / 0.2) ** 2 <= 1) & (y >= -0.6)
    leaves = _polygon(
        x,
        y,
        [(-0.95, -0.42), (-0.4, -0.62), (-0.55, -0.85), (-0.1, -0.66), (0.1, -0.66),
         (0.55, -0.85), (0.4, -0.62), (0.95, -0.42), (0.3, -0.5), (-0.3, -0.5)],
    )
    stem = (np.abs(x) <= 0.08) & (y >= -0.98) & (y <= -0.6)
    seeds = np.zeros(x.shape, dtype=bool)
    for sx, sy in [(-0.3, -0.1), (0.0, -0.2), (0.3, -0.1), (-0.17, 0.22), (0.17, 0.22),
                   (0.0, 0.52)]:
        seeds |= ((x - sx) / 0.06) ** 2 + ((y - sy) / 0.09) ** 2 <= 1
    return (body | top | leaves | stem) & ~seeds


def _diamond(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(x) / 0.62 + np.abs(y) / 0.98 <= 1


ICONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "star": _star,
    "heart": _heart,
    "smiley": _smiley,
    "fish": _fish,
    "flag": _flag,
    "cross": _cross,
    "moon": _moon,
    "lightning": _lightning,
    "strawberry": _strawberry,
    "diamond": _diamond,
}
"""Icon name -> inside test on normalised coordinates (x right, y down, both in [-1, 1])."""


def icon_names() -> list[str]:
    """Names accepted by :func:`draw_icon`."""
    return list(ICONS)


def check_icon(name: str) -> None:
    """``ValueError`` naming the allowed icons unless ``name`` is one of them."""
    if name not in ICONS:
        raise ValueError(f"unknown icon {name!r}; allowed icons: {', '.join(ICONS)}")


@functools.lru_cache(maxsize=256)
def _draw_icon_cached(name: str, size: int) -> np.ndarray:
    factor = max(4, math.ceil(128 / size))
    n = size * factor
    centres = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    y, x = np.meshgrid(centres, centres, indexing="ij")
    inside = ICONS[name](x, y).astype(np.float32)
    alpha = inside.reshape(size, factor, size, factor).mean(axis=(1, 3))
    alpha.setflags(write=False)
    return alpha


def draw_icon(name: str, size: int) -> np.ndarray:
    """Draw an icon as an anti-aliased alpha map.

    The shape is rasterised on a finer grid and box-filtered down, so edges are smooth at any size.

    Parameters
    ----------
    name : str
        One of :func:`icon_names` (star, heart, smiley, fish, flag, cross, moon, lightning,
        strawberry, diamond).
    size : int
        Side of the square output in pixels (at least 1).

    Returns
    -------
    numpy.ndarray
        Float32 array ``[size, size]`` with the covered fraction of each pixel, in [0, 1].
    """
    check_icon(name)
    return _draw_icon_cached(name, check_positive_int(size, "icon size")).copy()
