"""The embedded Trojan benchmark: Fashion-MNIST items rendered as colour scenes, with Trojans.

Plain gray items are too easy for saliency work (a coloured Trojan patch is then the only colour in
the image), so the default scenes tint each item with a random colour and composite it at a random
place and scale onto a random crop of a real colour photo (:func:`render_scenes`). The photos are
the ones bundled with scikit-image, scikit-learn and matplotlib, split into disjoint train and test
backgrounds (:mod:`spade_lib.photos`). :func:`build_split` plants the Trojan rules of
:mod:`spade_lib.trojan` on the training split (:class:`SceneSet`), :func:`poisoned_test` makes the
Trojan copies of test images (:class:`PoisonedSet`), and :func:`load_scenes` builds both splits for
a config.

Everything here is a pure function of its arguments and seed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from spade_lib.checks import check_choice
from spade_lib.data import SPLITS, load_fashion_mnist
from spade_lib.photos import (  # noqa: F401 (BACKGROUND_PHOTOS, background_photos re-exported)
    BACKGROUND_PHOTOS,
    background_photos,
    photo_count,
    render_backgrounds,
    sample_axis,
)
from spade_lib.trojan import (
    PLANT,
    TEST_COPIES,
    TrojanRule,
    apply_patches,
    assign_poison,
    eligible,
    rule_rng,
    rule_set,
)

__all__ = [
    "BACKGROUND_PHOTOS",
    "SCENES",
    "PoisonedSet",
    "SceneSet",
    "background_photos",
    "build_split",
    "load_scenes",
    "poisoned_test",
    "render_scenes",
]

_SPLIT_CODE = {"train": 1, "test": 2}
_CHUNK = 2048

SCENES = ("photo", "photo-shared", "plain")
"""Scene kinds: ``photo`` (train and test backgrounds from disjoint photos), ``photo-shared``
(both splits crop every photo; the crops differ) and ``plain`` (the gray item alone)."""

def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                        (v, p, q))]
    )
    return table[i, np.arange(len(h))]


def render_scenes(
    images28: np.ndarray | torch.Tensor,
    split: str,
    image_size: int = 32,
    scene: str = "photo",
    seed: int = 0,
    item_scale: tuple[float, float] = (0.5, 0.9),
    crop_scale: tuple[float, float] = (0.25, 1.0),
    alpha_gain: float = 2.0,
) -> torch.Tensor:
    """Render Fashion-MNIST items as colour scenes.

    ``"plain"``: the gray item resized to ``image_size`` (three equal channels).
    ``"photo"`` and ``"photo-shared"``: the item, tinted with a random colour (random hue,
    saturation 0.5-1, value 0.7-1, its own gray shading kept), is pasted at a random place and
    scale onto a square crop of a random background photo (crop side a random fraction
    ``crop_scale`` of the photo's short side, random position, resampled to ``image_size``).
    ``"photo"`` draws the photo from the split's own photos; ``"photo-shared"`` from all of them,
    so test backgrounds come from the training photos' distribution (the split still seeds the
    draws, so the crops differ). The item's intensity is its opacity:
    ``alpha = min(1, alpha_gain * intensity)``, so dark cloth stays opaque and the
    item's edges blend into the photo.

    Parameters
    ----------
    images28 : array-like
        uint8 items ``[N, 28, 28]``.
    split : {"train", "test"}
        Which background photos to use.
    image_size : int
        Side of the output in pixels (8 to 512).
    scene : {"photo", "photo-shared", "plain"}
    seed : int
        Same seed and split, same scenes.
    item_scale : tuple of float
        Range of the item's side as a fraction of ``image_size``.
    crop_scale : tuple of float
        Range of the background crop's side as a fraction of the photo's short side.
    alpha_gain : float
        Opacity per unit of item intensity.

    Returns
    -------
    torch.Tensor
        uint8 ``[N, 3, image_size, image_size]``.
    """
    items = _check_render_args(images28, split, image_size, scene, item_scale, crop_scale,
                               alpha_gain)
    if scene == "plain":
        return _render_plain(items, int(image_size))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split], 0x5CE7E]))
    pool = "shared" if scene == "photo-shared" else split
    layout = _draw_layout(rng, len(items), int(image_size), photo_count(pool), item_scale,
                          crop_scale)
    return _composite(items, pool, int(image_size), layout, alpha_gain)


def _check_render_args(images28: np.ndarray | torch.Tensor, split: str, image_size: int,
                       scene: str, item_scale: tuple[float, float],
                       crop_scale: tuple[float, float], alpha_gain: float) -> torch.Tensor:
    """:func:`render_scenes`' argument checks; returns the items as a uint8 tensor ``[N, H, W]``."""
    check_choice(split, SPLITS, "split")
    check_choice(scene, SCENES, "scene")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not (
        8 <= image_size <= 512
    ):
        raise ValueError(f"image_size must be an integer in [8, 512], got {image_size!r}")
    items = torch.as_tensor(np.asarray(images28))
    if items.ndim != 3 or items.dtype != torch.uint8:
        raise ValueError(
            f"images28 must be uint8 [N, H, W], got {tuple(items.shape)} {items.dtype}"
        )
    for name, (lo, hi) in (("item_scale", item_scale), ("crop_scale", crop_scale)):
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, got "
                             f"{(lo, hi)!r}")
    if alpha_gain <= 0:
        raise ValueError(f"alpha_gain must be positive, got {alpha_gain!r}")
    return items


def _render_plain(items: torch.Tensor, s: int) -> torch.Tensor:
    """The gray items ``[N, H, W]`` resized to ``s`` pixels, as uint8 ``[N, 3, s, s]``."""
    n = len(items)
    out = torch.empty(n, 3, s, s, dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        chunk = items[start : start + _CHUNK, None].float()
        if chunk.shape[-2:] != (s, s):
            chunk = F.interpolate(chunk, size=(s, s), mode="bilinear", align_corners=False)
        out[start : start + _CHUNK] = chunk.round().clamp(0, 255).to(torch.uint8)
    return out


def _draw_layout(rng: np.random.Generator, n: int, s: int, n_photos: int,
                 item_scale: tuple[float, float],
                 crop_scale: tuple[float, float]) -> dict[str, np.ndarray]:
    """The random draws of ``n`` scenes of side ``s``, in a fixed order (same rng, same scenes):
    background ``photo`` index, ``crop`` side and ``crop_pos``, ``item_side`` and ``item_pos`` in
    pixels, and the RGB ``tint`` ``[n, 3]``."""
    photo = rng.integers(0, n_photos, size=n)
    crop = rng.uniform(*crop_scale, size=n)
    crop_pos = rng.uniform(0.0, 1.0, size=(n, 2))
    item_side = rng.uniform(*item_scale, size=n) * s
    item_pos = rng.uniform(0.0, 1.0, size=(n, 2)) * (s - item_side)[:, None]
    tint = _hsv_to_rgb(
        rng.uniform(0.0, 1.0, size=n), rng.uniform(0.5, 1.0, size=n), rng.uniform(0.7, 1.0, size=n)
    )
    return {"photo": photo, "crop": crop, "crop_pos": crop_pos, "item_side": item_side,
            "item_pos": item_pos, "tint": tint}


def _composite(items: torch.Tensor, pool: str, s: int, layout: dict[str, np.ndarray],
               alpha_gain: float) -> torch.Tensor:
    """Paste the tinted items ``[N, H, W]`` onto their background crops, in chunks; uint8
    ``[N, 3, s, s]``."""
    n = len(items)
    h28, w28 = items.shape[1:]
    item_pos, item_side, tint = layout["item_pos"], layout["item_side"], layout["tint"]
    out = torch.empty(n, 3, s, s, dtype=torch.uint8)
    chunk = max(16, _CHUNK * 32 * 32 // (s * s))
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        m = sl.stop - sl.start
        background = render_backgrounds(pool, s, layout["photo"][sl], layout["crop"][sl],
                                         layout["crop_pos"][sl])
        # Map each output pixel into the item's 28x28 frame; outside it samples zeros.
        gy = sample_axis(-item_pos[sl, 0] / item_side[sl] * h28,
                          s / item_side[sl] * h28, s, h28)
        gx = sample_axis(-item_pos[sl, 1] / item_side[sl] * w28,
                          s / item_side[sl] * w28, s, w28)
        grid = torch.stack([gx[:, None, :].expand(-1, s, -1), gy[:, :, None].expand(-1, -1, s)],
                           dim=-1)
        intensity = F.grid_sample(items[sl, None].float() / 255.0, grid, mode="bilinear",
                                  padding_mode="zeros", align_corners=False)
        alpha = (alpha_gain * intensity).clamp_(max=1.0)
        shade = intensity.mul_(0.7).add_(0.3)
        scene_img = torch.from_numpy(tint[sl]).float().view(m, 3, 1, 1) * shade
        scene_img.sub_(background).mul_(alpha).add_(background)
        out[sl] = scene_img.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Trojan scene sets
# --------------------------------------------------------------------------------------------


def _plant(
    images: torch.Tensor,
    indices: np.ndarray,
    rule: TrojanRule,
    rng: np.random.Generator,
    scale: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch uint8 images ``images[indices]`` in chunks; returns uint8 images and masks."""
    s = images.shape[-1]
    patched = torch.empty(len(indices), 3, images.shape[-2], s, dtype=torch.uint8)
    masks = torch.empty(len(indices), images.shape[-2], s, dtype=torch.bool)
    chunk = max(16, _CHUNK * 32 * 32 // (images.shape[-2] * s))
    for start in range(0, len(indices), chunk):
        idx = torch.from_numpy(indices[start : start + chunk])
        floats = images[idx].float() / 255.0
        out, mask = apply_patches(floats, rule, rng, scale=scale, alpha=alpha)
        patched[start : start + len(idx)] = (out * 255).round().clamp(0, 255).to(torch.uint8)
        masks[start : start + len(idx)] = mask
    return patched, masks


@dataclass(eq=False)
class SceneSet(Dataset):
    """A rendered Trojan scene split.

    Attributes
    ----------
    images : torch.Tensor
        uint8 ``[N, 3, S, S]``, with Trojan patches planted on the poisoned training samples.
    labels : torch.Tensor
        int64 ``[N]``, the training labels (the rule's target where a patch was planted).
    clean_labels : torch.Tensor
        int64 ``[N]``, the true Fashion-MNIST class.
    rule : torch.Tensor
        int64 ``[N]``, index into ``rules`` of the planted Trojan, -1 for clean samples.
    masks : torch.Tensor
        bool ``[N, S, S]``, the exact patch pixels (all False for clean samples).
    index : torch.Tensor
        int64 ``[N]``, position of each sample in the Fashion-MNIST split.
    rules : tuple of TrojanRule
    split, scene : str
    image_size, seed : int
    patch_scale, patch_alpha : float
        Icon size (fraction of the side) and opacity used for planting.
    transform : callable, optional
        Applied to the float image in ``__getitem__`` (e.g. training augmentation).
    """

    images: torch.Tensor
    labels: torch.Tensor
    clean_labels: torch.Tensor
    rule: torch.Tensor
    masks: torch.Tensor
    index: torch.Tensor
    rules: tuple[TrojanRule, ...]
    split: str
    scene: str
    image_size: int
    seed: int
    patch_scale: float = 0.25
    patch_alpha: float = 0.8
    transform: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float image ``[3, S, S]`` in [0, 1] (after ``transform``) and its training label."""
        image = self.images[i].float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[i]

    def float_images(self, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Images as float in [0, 1], all or the given indices (no ``transform``)."""
        images = self.images if indices is None else self.images[torch.as_tensor(indices)]
        return images.float() / 255.0


def build_split(
    split: str,
    image_size: int = 32,
    scene: str = "photo",
    rules: Sequence[TrojanRule] | str | None = "fashion",
    seed: int = 0,
    size: int | None = None,
    data_dir: str | os.PathLike | None = None,
    poison: bool = True,
    fraction: float | None = None,
    patch_scale: float = 0.25,
    patch_alpha: float = 0.8,
    **scene_kw: object,
) -> SceneSet:
    """Build one split of the embedded Trojan benchmark.

    Loads Fashion-MNIST, optionally subsamples it, renders the scenes (:func:`render_scenes`)
    and, for the training split, plants each rule's patch on its share of samples
    (:func:`~spade_lib.trojan.assign_poison`) and overrides their labels. The test split stays
    clean; use :func:`poisoned_test` for its Trojan copies.

    Parameters
    ----------
    split : {"train", "test"}
    image_size : int
    scene : {"photo", "photo-shared", "plain"}
    rules : sequence of TrojanRule, str or None
        The rules, or the name of a rule set; None for no Trojans.
    seed : int
        Seed for subsampling, rendering, assignment and planting.
    size : int, optional
        Keep this many samples (a deterministic random subset, in original order).
    data_dir : path-like, optional
        Passed to :func:`spade_lib.data.load_fashion_mnist`.
    poison : bool
        Plant the Trojans on the training split.
    fraction : float, optional
        Replaces every rule's ``fraction`` (share of the training set per rule).
    patch_scale, patch_alpha : float
        Icon side as a fraction of the image side, and the patch opacity (paper: 0.25, 0.8).
    **scene_kw
        Extra arguments of :func:`render_scenes` (``item_scale``, ``crop_scale``, ``alpha_gain``).
    """
    check_choice(split, SPLITS, "split")
    rules = tuple(rule_set(rules) if isinstance(rules, str) else (rules or ()))
    if fraction is not None:
        rules = tuple(dataclasses.replace(rule, fraction=fraction) for rule in rules)
    for rule in rules:
        if rule.multilabel:
            raise ValueError(f"rule {rule.name!r} has a multi-label target; Fashion-MNIST scenes "
                             "need class targets")
    images28, labels = load_fashion_mnist(split, data_dir)
    index = np.arange(len(labels))
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not (
            1 <= size <= len(labels)
        ):
            raise ValueError(f"size must be an integer in [1, {len(labels)}], got {size!r}")
        pick = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split], 5]))
        index = np.sort(pick.choice(len(labels), size=int(size), replace=False))
        images28, labels = images28[index], labels[index]
    images = render_scenes(images28, split, image_size, scene, seed, **scene_kw)
    n, s = len(labels), images.shape[-1]
    clean = torch.from_numpy(labels)
    train_labels = clean.clone()
    rule_ids = torch.full((n,), -1, dtype=torch.int64)
    masks = torch.zeros(n, s, s, dtype=torch.bool)
    if split == "train" and poison and rules:
        assignment = assign_poison(labels, rules, seed)
        for k, rule in enumerate(rules):
            idx = np.flatnonzero(assignment == k)
            patched, mask = _plant(images, idx, rule, rule_rng(seed, PLANT, k), patch_scale,
                                   patch_alpha)
            t_idx = torch.from_numpy(idx)
            images[t_idx] = patched
            masks[t_idx] = mask
            train_labels[t_idx] = int(rule.target)
            rule_ids[t_idx] = k
    return SceneSet(
        images=images, labels=train_labels, clean_labels=clean, rule=rule_ids, masks=masks,
        index=torch.from_numpy(index), rules=rules, split=split, scene=scene, image_size=s,
        seed=int(seed), patch_scale=patch_scale, patch_alpha=patch_alpha,
    )


@dataclass(eq=False)
class PoisonedSet(Dataset):
    """Trojan copies of clean images, for attack success (Table C.10) and saliency evaluation.

    Attributes
    ----------
    images : torch.Tensor
        uint8 ``[M, 3, S, S]``, each with one rule's patch.
    masks : torch.Tensor
        bool ``[M, S, S]``, the exact patch pixels.
    clean_labels : torch.Tensor
        int64 ``[M]``, the true class.
    labels : torch.Tensor
        int64 ``[M]``, the rule's target (what a backdoored model predicts).
    rule : torch.Tensor
        int64 ``[M]``, index into ``rules``.
    index : torch.Tensor
        int64 ``[M]``, position of the clean image in the set it was made from.
    rules : tuple of TrojanRule
    """

    images: torch.Tensor
    masks: torch.Tensor
    clean_labels: torch.Tensor
    labels: torch.Tensor
    rule: torch.Tensor
    index: torch.Tensor
    rules: tuple[TrojanRule, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float image ``[3, S, S]`` in [0, 1] and the Trojan target label."""
        return self.images[i].float() / 255.0, self.labels[i]

    def float_images(self, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Images as float in [0, 1], all or the given indices."""
        images = self.images if indices is None else self.images[torch.as_tensor(indices)]
        return images.float() / 255.0


def poisoned_test(
    scene_set: SceneSet,
    rules: Sequence[TrojanRule] | str | None = None,
    seed: int = 0,
    per_rule: int | None = None,
    patch_scale: float | None = None,
    patch_alpha: float | None = None,
) -> PoisonedSet:
    """Patch every eligible clean image of a set with each rule.

    For rule ``k`` the eligible images are the clean ones (``scene_set.rule == -1``) whose true
    class is the rule's source (or any) and differs from its target. Results are grouped by rule.

    Parameters
    ----------
    scene_set : SceneSet
        Usually the test split.
    rules : sequence of TrojanRule or str, optional
        Defaults to the set's own rules.
    seed : int
        Same seed, same patches.
    per_rule : int, optional
        Keep at most this many images per rule (a deterministic random subset, in order).
    patch_scale, patch_alpha : float, optional
        Default to the values the set was built with.
    """
    if rules is None:
        rules = scene_set.rules
    rules = tuple(rule_set(rules) if isinstance(rules, str) else rules)
    if not rules:
        raise ValueError("poisoned_test needs at least one rule")
    if per_rule is not None and (isinstance(per_rule, bool) or per_rule < 1):
        raise ValueError(f"per_rule must be a positive integer or None, got {per_rule!r}")
    clean = scene_set.clean_labels.numpy()
    is_clean = scene_set.rule.numpy() == -1
    parts: list[tuple[torch.Tensor, ...]] = []
    for k, rule in enumerate(rules):
        idx = np.flatnonzero(eligible(clean, rule) & is_clean)
        rng = rule_rng(seed, TEST_COPIES, k)
        if per_rule is not None and len(idx) > per_rule:
            idx = np.sort(rng.choice(idx, size=per_rule, replace=False))
        patched, mask = _plant(
            scene_set.images, idx, rule, rng,
            scene_set.patch_scale if patch_scale is None else patch_scale,
            scene_set.patch_alpha if patch_alpha is None else patch_alpha,
        )
        t_idx = torch.from_numpy(idx)
        parts.append((patched, mask, scene_set.clean_labels[t_idx],
                      torch.full((len(idx),), int(rule.target), dtype=torch.int64),
                      torch.full((len(idx),), k, dtype=torch.int64), t_idx))
    images, masks, clean_labels, labels, rule_ids, index = (torch.cat(c) for c in zip(*parts,
                                                                                        strict=True))
    return PoisonedSet(images, masks, clean_labels, labels, rule_ids, index, rules)


@functools.lru_cache(maxsize=2)
def _load_scenes_cached(key: tuple) -> tuple[SceneSet, SceneSet]:
    (data_dir, scene, image_size, train_size, test_size, rules, fraction, scale, alpha,
     seed) = key
    common = {"image_size": image_size, "scene": scene, "rules": rules, "seed": seed,
              "data_dir": data_dir, "patch_scale": scale, "patch_alpha": alpha}
    train = build_split("train", size=train_size, poison=fraction > 0,
                        fraction=fraction if fraction > 0 else None, **common)
    test = build_split("test", size=test_size, **common)
    return train, test


def load_scenes(cfg: Any) -> tuple[SceneSet, SceneSet]:
    """The train and test splits of the embedded benchmark for a config.

    Reads ``dataset``, ``data_dir``, ``scene``, ``image_size``, ``train_size``, ``test_size``,
    ``rules``, ``trojan_fraction``, ``patch_scale``, ``patch_alpha`` and ``seed`` from ``cfg``
    (a :class:`spade_lib.config.Config` or anything with those attributes). Results are kept in
    memory for the last two configs; the returned sets share tensors with that cache, so do not
    modify them in place.

    Raises
    ------
    ValueError
        If ``cfg.dataset`` is not ``"fashion-mnist"`` (use
        :func:`spade_lib.datasets.image_folder` or :func:`spade_lib.datasets.celeba` for the
        full-scale datasets).
    """
    dataset = getattr(cfg, "dataset", "fashion-mnist")
    if dataset != "fashion-mnist":
        raise ValueError(
            f"load_scenes builds the embedded 'fashion-mnist' benchmark, got dataset {dataset!r}; "
            "load full-scale data with spade_lib.datasets.image_folder or spade_lib.datasets.celeba"
        )
    data_dir = getattr(cfg, "data_dir", None)
    key = (
        None if data_dir is None else str(data_dir),
        cfg.scene, int(cfg.image_size), cfg.train_size, cfg.test_size, cfg.rules,
        float(cfg.trojan_fraction), float(cfg.patch_scale), float(cfg.patch_alpha), int(cfg.seed),
    )
    train, test = _load_scenes_cached(key)
    return dataclasses.replace(train), dataclasses.replace(test)
