"""Argument checks shared by the library: images, batches of images, positive integers, seeds,
noise levels, choices and the columns of a table.

Each check raises ``ValueError`` whose message names the argument, the bad value and what is
allowed, so a caller sees what to change without reading the code.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = ["check_choice", "check_columns", "check_image", "check_images", "check_noise",
           "check_positive_int", "check_seed"]


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` if it is an integer >= 1 (not a bool).

    Parameters
    ----------
    value
        The argument to check (``int`` or numpy integer).
    name
        How the message names it, e.g. ``"batch_size"`` or ``"option n_steps"``.

    Raises
    ------
    ValueError
        ``"{name} must be an integer >= 1 (a positive integer), got {value!r}"``.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (a positive integer), got {value!r}")
    return int(value)


def check_images(images: Any, what: str = "images", channels: int | None = None,
                 unit_range: bool = False, allow_empty: bool = False) -> Tensor:
    """Check a batch of images ``[N, C, H, W]`` and return it detached.

    Parameters
    ----------
    images
        The batch (batch in dim 0).
    what
        How the messages name it.
    channels
        The number of channels ``C`` it must have; any if None.
    unit_range
        Values must lie in [0, 1].
    allow_empty
        Accept ``N == 0``.

    Raises
    ------
    ValueError
        Not a tensor, not 4-D (or not ``channels`` channels), not floating point, empty (unless
        ``allow_empty``), NaN or inf, or (with ``unit_range``) a value outside [0, 1].
    """
    shape = f"[N, {channels if channels is not None else 'C'}, H, W]"
    if not isinstance(images, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor {shape}, got {type(images).__name__}")
    if images.dim() != 4 or (channels is not None and images.shape[1] != channels):
        raise ValueError(f"{what} must have shape {shape} (batch in dim 0; use image[None] "
                         f"for one image), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{what} must be a float tensor"
                         f"{' in [0, 1]' if unit_range else ''}, got {images.dtype}")
    if images.shape[0] == 0:
        if allow_empty:
            return images.detach()
        raise ValueError(f"{what} is an empty batch")
    if not torch.isfinite(images).all():
        raise ValueError(f"{what} contain NaN or inf"
                         f"{'; allowed: finite values in [0, 1]' if unit_range else ''}")
    if unit_range and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{what} must hold finite values in [0, 1], got values in "
                         f"[{float(images.min()):.4g}, {float(images.max()):.4g}]")
    return images.detach()


def check_image(image: Any, dtype: torch.dtype | None = None) -> Tensor:
    """Check one image is ``[3, H, W]`` or ``[1, 3, H, W]`` and finite; return ``[3, H, W]``.

    ``dtype``: the model's floating dtype, which the image must then have.

    Raises
    ------
    ValueError
        Not a tensor, another shape, not floating point, another dtype than ``dtype``, or NaN
        or inf values.
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


def check_choice(value: Any, allowed: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``allowed``.

    Raises
    ------
    ValueError
        ``"unknown {what} {value!r}; allowed: a, b, c"``.
    """
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


def check_seed(seed: Any) -> int:
    """``seed`` as an ``int`` if it is a non-negative integer (not a bool)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def check_noise(noise: Any) -> float:
    """``noise`` as a ``float`` if it is a finite number > 0 (a standard deviation as a fraction
    of the input range [0, 1], as :func:`spade_lib.fidelity.noisy_copies` takes it)."""
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not (
            math.isfinite(noise) and noise > 0):
        raise ValueError(f"noise must be a positive number (standard deviation as a fraction of "
                         f"the input range [0, 1]), got {noise!r}")
    return float(noise)


def check_columns(rows: Any, columns: Sequence[str], source: str) -> None:
    """Fail unless ``rows`` is a DataFrame with ``columns``; the message names the missing ones
    and ``source``, the function whose table the caller should pass (e.g. ``"evaluate()"``)."""
    if not isinstance(rows, pd.DataFrame):
        raise ValueError(f"expected the table of {source}, got {type(rows).__name__}")
    missing = [c for c in columns if c not in rows.columns]
    if missing:
        raise ValueError(f"the table lacks columns {missing}; pass the table of {source}")
