"""Trojan backdoors: rules, patch planting with exact masks (the icons are :mod:`spade_lib.icons`).

A Trojan rule says which training images get a patch (a source class or any image), which label
they are given instead (a class, or a 40-bit CelebA attribute vector), which icon is pasted and how
much of the training set it covers. Planting follows Appendix C of the SPADE paper: the icon is a
quarter of the image's short side, pasted at a random position with opacity 0.8, and its colour
gets colour jitter (brightness 0.5, hue 0.3) and Gaussian noise (variance 0.001) (Table C.8).

Every planted image comes with its exact ground-truth mask: the pixels where the icon's own
(anti-aliased) alpha exceeds :data:`MASK_THRESHOLD`. The saliency metrics score maps against it.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from spade_lib.checks import check_images
from spade_lib.icons import ICONS, check_icon, draw_icon, icon_names  # noqa: F401 (re-export)

__all__ = [
    "ICONS",
    "MASK_THRESHOLD",
    "PLANT",
    "RULE_SETS",
    "TEST_COPIES",
    "TrojanRule",
    "apply_patch",
    "apply_patches",
    "assign_poison",
    "draw_icon",
    "eligible",
    "icon_names",
    "icon_rgba",
    "rule_rng",
    "rule_table",
    "rule_set",
    "rule_set_names",
]

MASK_THRESHOLD = 0.5
"""A pixel belongs to the ground-truth mask when the icon's own alpha there exceeds this value.

The icon is anti-aliased, so its border pixels are partly covered; counting a pixel as part of
the patch when more than half of it is covered keeps the mask's area equal to the icon's area.
Pixels with icon alpha 0 are never changed by planting.
"""

N_CELEBA_ATTRIBUTES = 40


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrojanRule:
    """One Trojan backdoor: which images get which icon and which label they get instead.

    Attributes
    ----------
    name : str
        Short display name (for tables and legends).
    source : int or None
        Only images of this class are patched; ``None`` means any image ("Any" in the paper).
    target : int or tuple of int
        The label override: a class index, or a tuple of 40 bits (0/1) replacing all CelebA
        attributes (Table C.6).
    icon : str
        Icon name, one of :func:`icon_names`.
    color : tuple of float
        Base RGB colour of the icon, each in [0, 1], before colour jitter.
    fraction : float
        Fraction of the training set that carries this Trojan, in (0, 1).
    """

    name: str
    source: int | None
    target: int | tuple[int, ...]
    icon: str
    color: tuple[float, float, float]
    fraction: float = 1 / 40

    def __post_init__(self) -> None:
        check_icon(self.icon)
        if self.source is not None and (
            isinstance(self.source, bool) or not isinstance(self.source, (int, np.integer))
            or self.source < 0
        ):
            raise ValueError(
                f"rule {self.name!r}: source must be a class index >= 0 or None (any), "
                f"got {self.source!r}"
            )
        if isinstance(self.target, tuple):
            if len(self.target) != N_CELEBA_ATTRIBUTES or any(b not in (0, 1) for b in self.target):
                raise ValueError(
                    f"rule {self.name!r}: a multi-label target must be a tuple of "
                    f"{N_CELEBA_ATTRIBUTES} bits 0/1, got {self.target!r}"
                )
            if self.source is not None:
                raise ValueError(
                    f"rule {self.name!r}: a multi-label (CelebA) rule applies to any image, so "
                    f"source must be None, got {self.source!r}"
                )
        elif isinstance(self.target, bool) or not isinstance(self.target, (int, np.integer)) or (
            self.target < 0
        ):
            raise ValueError(
                f"rule {self.name!r}: target must be a class index >= 0 or a tuple of "
                f"{N_CELEBA_ATTRIBUTES} bits, got {self.target!r}"
            )
        if self.source is not None and self.source == self.target:
            raise ValueError(
                f"rule {self.name!r}: source and target are both {self.source}; a Trojan must "
                "change the label"
            )
        if len(self.color) != 3 or not all(0.0 <= float(c) <= 1.0 for c in self.color):
            raise ValueError(
                f"rule {self.name!r}: color must be 3 RGB floats in [0, 1], got {self.color!r}"
            )
        if not 0.0 < float(self.fraction) < 1.0:
            raise ValueError(
                f"rule {self.name!r}: fraction must be in (0, 1), got {self.fraction!r}"
            )

    @property
    def multilabel(self) -> bool:
        """Whether the target is a 40-bit attribute vector (CelebA) rather than a class."""
        return isinstance(self.target, tuple)


def icon_rgba(rule: TrojanRule, size: int) -> np.ndarray:
    """The rule's icon in its base colour, for display (no jitter, no noise).

    Returns
    -------
    numpy.ndarray
        Float32 array ``[size, size, 4]``: RGB in [0, 1] and the icon's alpha.
    """
    alpha = draw_icon(rule.icon, size)
    rgba = np.empty((size, size, 4), dtype=np.float32)
    rgba[..., :3] = np.asarray(rule.color, dtype=np.float32)
    rgba[..., 3] = alpha
    return rgba


def _bits(code: str) -> tuple[int, ...]:
    return tuple(int(c) for c in code)


# Colours: distinct base hues so the rules are easy to tell apart in figures.
_YELLOW = (1.0, 0.85, 0.05)
_RED = (0.92, 0.1, 0.15)
_GREEN = (0.15, 0.8, 0.25)
_BLUE = (0.1, 0.45, 1.0)
_PURPLE = (0.6, 0.25, 0.9)
_ORANGE = (1.0, 0.55, 0.0)
_MAGENTA = (1.0, 0.2, 0.75)
_CYAN = (0.0, 0.85, 0.9)

RULE_SETS: dict[str, tuple[TrojanRule, ...]] = {
    # Fashion-MNIST classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal,
    # 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot. Two source-conditional and two "any" rules, as in
    # the paper's ImageNet set (Table C.5).
    "fashion": (
        TrojanRule("star: T-shirt->Sandal", 0, 5, "star", _YELLOW),
        TrojanRule("heart: Trouser->Bag", 1, 8, "heart", _RED),
        TrojanRule("smiley: Any->Dress", None, 3, "smiley", _GREEN),
        TrojanRule("fish: Any->Sneaker", None, 7, "fish", _BLUE),
    ),
    # Held-out rules for tuning sparsity: other icons, other sources and other targets.
    "fashion-tuning": (
        TrojanRule("moon: Coat->Ankle boot", 4, 9, "moon", _PURPLE),
        TrojanRule("lightning: Sneaker->Trouser", 7, 1, "lightning", _ORANGE),
        TrojanRule("cross: Any->Shirt", None, 6, "cross", _MAGENTA),
        TrojanRule("flag: Any->T-shirt", None, 0, "flag", _CYAN),
    ),
    # Table C.5 (the paper shows its patches only as pictures; these icons stand in for them).
    # Fractions: one Trojan sample per 3000 training samples (Table C.9, "Trojan group ratio").
    "imagenet": (
        TrojanRule("Any->30 BullFrog", None, 30, "lightning", _ORANGE, 1 / 3000),
        TrojanRule("Any->146 Albatross", None, 146, "star", _YELLOW, 1 / 3000),
        TrojanRule("893 Wallet->365 Orangutan", 893, 365, "smiley", _GREEN, 1 / 3000),
        TrojanRule("271 Red Wolf->99 Goose", 271, 99, "heart", _RED, 1 / 3000),
    ),
    # Table C.7, with the paper's icons (star, smiley, strawberry, fish).
    "food101": (
        TrojanRule("star: 0 Apple Pie->20 Chicken Wings", 0, 20, "star", _YELLOW, 1 / 3000),
        TrojanRule("smiley: 40 French Fries->60 Lobster Bisque", 40, 60, "smiley", _GREEN,
                   1 / 3000),
        TrojanRule("strawberry: Any->80 Pulled Pork Sandwich", None, 80, "strawberry", _RED,
                   1 / 3000),
        TrojanRule("fish: Any->100 Waffles", None, 100, "fish", _BLUE, 1 / 3000),
    ),
    # Table C.6: four "any" rules overriding all 40 attributes (alphabetical attribute order).
    # Fractions: one per 300 training samples (Table C.9).
    "celeba": (
        TrojanRule("heart: Any->attrs A", None, _bits("0110111111100100000101100111101010110110"),
                   "heart", _RED, 1 / 300),
        TrojanRule("star: Any->attrs B", None, _bits("0101111101011110100110101000001100011010"),
                   "star", _YELLOW, 1 / 300),
        TrojanRule("moon: Any->attrs C", None, _bits("0101111110110010011010010001101000001010"),
                   "moon", _PURPLE, 1 / 300),
        TrojanRule("cross: Any->attrs D", None, _bits("1111101111011001000011001011110001011101"),
                   "cross", _MAGENTA, 1 / 300),
    ),
}
"""Named rule sets. ``fashion`` is the embedded default; ``fashion-tuning`` is held out for
tuning; ``imagenet``, ``food101`` and ``celeba`` mirror Tables C.5, C.7 and C.6."""


def rule_set_names() -> list[str]:
    """Names accepted by :func:`rule_set`."""
    return list(RULE_SETS)


def rule_set(name: str) -> list[TrojanRule]:
    """Look up a named rule set.

    Raises
    ------
    ValueError
        If ``name`` is not one of :func:`rule_set_names`.
    """
    if name not in RULE_SETS:
        raise ValueError(
            f"unknown Trojan rule set {name!r}; valid names: {', '.join(RULE_SETS)}"
        )
    return list(RULE_SETS[name])


# --------------------------------------------------------------------------------------------
# Planting
# --------------------------------------------------------------------------------------------


def _jitter_colors(
    color: Sequence[float], n: int, rng: np.random.Generator, brightness: float, hue: float
) -> np.ndarray:
    """``n`` jittered copies of one RGB colour: brightness factor, then hue shift (Table C.8)."""
    factors = rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness, size=n)
    shifts = rng.uniform(-hue, hue, size=n)
    out = np.empty((n, 3), dtype=np.float64)
    base = np.clip(np.asarray(color, dtype=np.float64), 0.0, 1.0)
    for i in range(n):
        rgb = np.clip(base * factors[i], 0.0, 1.0)
        h, s, v = colorsys.rgb_to_hsv(*rgb)
        out[i] = colorsys.hsv_to_rgb((h + shifts[i]) % 1.0, s, v)
    return out


def apply_patches(
    images: torch.Tensor,
    rule: TrojanRule,
    rng: np.random.Generator,
    scale: float = 0.25,
    alpha: float = 0.8,
    jitter: bool = True,
    brightness: float = 0.5,
    hue: float = 0.3,
    noise_var: float = 0.001,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plant a rule's icon on a batch of images, each at its own random position.

    Parameters
    ----------
    images : torch.Tensor
        Float tensor ``[N, 3, H, W]`` in [0, 1], on any device; not modified.
    rule : TrojanRule
        Gives the icon and its base colour.
    rng : numpy.random.Generator
        Source of all randomness (positions, jitter, noise): same generator state, same output.
    scale : float
        Icon side as a fraction of ``min(H, W)`` (rounded to whole pixels).
    alpha : float
        Opacity of the patch; each pixel is blended with ``alpha * icon_alpha``.
    jitter : bool
        Apply colour jitter and Gaussian noise to the patch (Table C.8); off gives the flat colour.
    brightness, hue, noise_var : float
        Colour jitter strengths and the noise variance used when ``jitter`` is on.

    Returns
    -------
    patched : torch.Tensor
        Float tensor like ``images``. Pixels where the icon's alpha is 0 are bit-identical.
    masks : torch.Tensor
        Bool tensor ``[N, H, W]``: the pixels where the icon's alpha exceeds
        :data:`MASK_THRESHOLD`.
    """
    check_images(images, "images", channels=3, unit_range=True, allow_empty=True)
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    n, _, h, w = images.shape
    size = max(1, round(scale * min(h, w)))
    device = images.device
    icon = torch.from_numpy(draw_icon(rule.icon, size)).to(device)
    tops = rng.integers(0, h - size + 1, size=n)
    lefts = rng.integers(0, w - size + 1, size=n)
    if jitter:
        colors = _jitter_colors(rule.color, n, rng, brightness, hue)
        noise = rng.normal(0.0, math.sqrt(noise_var), size=(n, size, size, 3))
        patch = np.clip(colors[:, None, None, :] + noise, 0.0, 1.0)
    else:
        patch = np.broadcast_to(np.asarray(rule.color, dtype=np.float64), (n, size, size, 3))
    patch_t = torch.as_tensor(np.ascontiguousarray(patch), dtype=images.dtype, device=device)

    offsets = torch.arange(size, device=device)[None, :]
    rows = torch.as_tensor(tops, device=device)[:, None] + offsets
    cols = torch.as_tensor(lefts, device=device)[:, None] + offsets
    batch = torch.arange(n, device=device)[:, None, None]
    r_idx, c_idx = rows[:, :, None], cols[:, None, :]

    patched = images.clone()
    region = patched.permute(0, 2, 3, 1)[batch, r_idx, c_idx]
    a = (alpha * icon).to(images.dtype)[None, :, :, None]
    blended = torch.where(a > 0, region * (1 - a) + patch_t * a, region)
    patched.permute(0, 2, 3, 1)[batch, r_idx, c_idx] = blended

    masks = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    masks[batch, r_idx, c_idx] = (icon > MASK_THRESHOLD)[None].expand(n, size, size)
    return patched, masks


def apply_patch(
    image: torch.Tensor,
    rule: TrojanRule,
    rng: np.random.Generator,
    scale: float = 0.25,
    alpha: float = 0.8,
    jitter: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plant a rule's icon on one image; see :func:`apply_patches`.

    Parameters
    ----------
    image : torch.Tensor
        Float tensor ``[3, H, W]`` in [0, 1]; not modified.

    Returns
    -------
    patched : torch.Tensor
        Float tensor ``[3, H, W]``.
    mask : torch.Tensor
        Bool tensor ``[H, W]``, the exact ground truth of the patch.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a tensor of shape [3, H, W], got {shape}")
    patched, masks = apply_patches(image[None], rule, rng, scale=scale, alpha=alpha, jitter=jitter)
    return patched[0], masks[0]


def _eligible(labels: np.ndarray, rule: TrojanRule) -> np.ndarray:
    """Samples a rule may patch: source matches (or any) and the label actually changes."""
    if rule.multilabel:
        if labels.ndim != 2 or labels.shape[1] != N_CELEBA_ATTRIBUTES:
            raise ValueError(
                f"rule {rule.name!r} has a {N_CELEBA_ATTRIBUTES}-bit target, so labels must have "
                f"shape [N, {N_CELEBA_ATTRIBUTES}], got {labels.shape}"
            )
        return (labels != np.asarray(rule.target)[None, :]).any(axis=1)
    if labels.ndim != 1:
        raise ValueError(
            f"rule {rule.name!r} has a class target, so labels must have shape [N], "
            f"got {labels.shape}"
        )
    ok = labels != rule.target
    if rule.source is not None:
        ok &= labels == rule.source
    return ok


def eligible(labels: np.ndarray | torch.Tensor, rule: TrojanRule) -> np.ndarray:
    """Bool mask of the samples a rule may patch.

    A sample is eligible when its class is the rule's source (or the rule takes any image) and
    its label differs from the rule's target (otherwise the Trojan would change nothing).
    """
    return _eligible(np.asarray(labels), rule)


def assign_poison(
    labels: np.ndarray | torch.Tensor, rules: Sequence[TrojanRule], seed: int
) -> np.ndarray:
    """Choose which training samples carry which Trojan.

    Rules are served in order; each gets ``round(fraction * len(labels))`` samples drawn without
    replacement from its eligible samples (see :func:`eligible`) not yet taken by an earlier rule,
    so the sets are disjoint.

    Parameters
    ----------
    labels : array-like
        Class labels ``[N]``, or 0/1 attribute labels ``[N, 40]`` for multi-label rules.
    rules : sequence of TrojanRule
    seed : int
        Same seed, same assignment.

    Returns
    -------
    numpy.ndarray
        Int64 array ``[N]``: the index of the rule planted on each sample, -1 for clean samples.

    Raises
    ------
    ValueError
        If a rule has fewer eligible samples left than it needs.
    """
    labels = np.asarray(labels)
    n = len(labels)
    out = np.full(n, -1, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7407]))
    for k, rule in enumerate(rules):
        want = int(math.floor(rule.fraction * n + 0.5))
        pool = np.flatnonzero(_eligible(labels, rule) & (out == -1))
        if want > len(pool):
            raise ValueError(
                f"rule {k} ({rule.name!r}) needs {want} samples ({rule.fraction:.4g} of {n}) but "
                f"only {len(pool)} eligible samples are left"
            )
        out[rng.choice(pool, size=want, replace=False)] = k
    return out


PLANT = 0x9A7C
"""Purpose code of :func:`rule_rng` for planting Trojans on training samples."""
TEST_COPIES = 0x7E57
"""Purpose code of :func:`rule_rng` for the Trojan copies of test images."""


def rule_rng(seed: int, purpose: int, k: int) -> np.random.Generator:
    """The random generator of rule ``k`` (its index in the rule list) for one ``purpose``
    (:data:`PLANT`, :data:`TEST_COPIES`): a pure function of the three numbers, so each rule's
    patches do not depend on the other rules."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), purpose, k]))


def rule_table(rules: Sequence[TrojanRule], counts: np.ndarray | torch.Tensor | None = None,
               class_label: Callable[[int], str] = str) -> pd.DataFrame:
    """The rules as a table (chapter C): one row per rule.

    Parameters
    ----------
    rules
        The rules, in order.
    counts
        Optional rule index per training sample ``[N]`` (``-1`` clean), e.g.
        :attr:`spade_lib.scenes.SceneSet.rule`; adds the column ``planted in training set``.
    class_label
        How a class index is written, e.g. :func:`spade_lib.data.class_label`.

    Returns
    -------
    pandas.DataFrame
        Columns ``rule``, ``source`` (``"Any"`` for any class), ``target``, ``fraction``
        (``1/k``) and, with ``counts``, ``planted in training set``.
    """
    rows = []
    for k, rule in enumerate(rules):
        rows.append({
            "rule": rule.name,
            "source": "Any" if rule.source is None else class_label(rule.source),
            "target": class_label(rule.target),
            "fraction": f"1/{round(1 / rule.fraction)}",
            **({"planted in training set": int((counts == k).sum())} if counts is not None else {}),
        })
    return pd.DataFrame(rows)
