"""Data: Fashion-MNIST, the embedded Trojan scenes, and loaders for the full-scale datasets.

The embedded benchmark is built from Fashion-MNIST. Plain gray items are too easy for saliency
work (a coloured Trojan patch is then the only colour in the image), so the default scenes tint
each item with a random colour and composite it at a random place and scale onto a random crop of
a real colour photo. The photos are the ones bundled with scikit-image, scikit-learn and
matplotlib, split into disjoint train and test backgrounds (see :data:`BACKGROUND_PHOTOS`).

Everything here is a pure function of its arguments and seed; nothing is downloaded unless
Fashion-MNIST is missing and torchvision is allowed to fetch it.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from spade_lib.trojan import TrojanRule, apply_patches, assign_poison, eligible, rule_set

__all__ = [
    "BACKGROUND_PHOTOS",
    "FASHION_CLASSES",
    "FASHION_SYSTEM_DIR",
    "CelebA",
    "ImageFolder",
    "PoisonedSet",
    "SceneSet",
    "TrojanDataset",
    "background_photos",
    "build_split",
    "celeba",
    "image_folder",
    "load_fashion_mnist",
    "load_scenes",
    "poisoned_test",
    "render_scenes",
]

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST class names, by label."""

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the idx files."""

_SPLITS = ("train", "test")
_SPLIT_CODE = {"train": 1, "test": 2}
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CHUNK = 2048


def _check_split(split: str, allowed: Sequence[str] = _SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(allowed)}")


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise ValueError(f"{path} is truncated: expected {count} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=offset).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for sub in (directory, directory / "fashion-mnist", directory / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (sub / name).is_file():
                return sub / name
    return None


@functools.lru_cache(maxsize=4)
def _load_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(images_path)
    labels = _read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{images_path} and {labels_path} do not form a dataset: shapes {images.shape} and "
            f"{labels.shape}"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_from(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    stems = _FASHION_FILES[split]
    paths = [_find_idx(directory, stem) for stem in stems]
    if any(p is None for p in paths):
        return None
    images, labels = _load_idx_pair(paths[0], paths[1])
    return images.copy(), labels.copy()


def _download_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spade_lib"


def _download_fashion_mnist(root: Path, split: str) -> None:
    """Fetch Fashion-MNIST with torchvision's downloader (needs internet)."""
    from torchvision.datasets import FashionMNIST

    FashionMNIST(root=str(root), train=split == "train", download=True)


def load_fashion_mnist(
    split: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST from its idx files.

    Looks, in order, in ``data_dir`` (or the ``SPADE_DATA_DIR`` environment variable), in
    :data:`FASHION_SYSTEM_DIR` (the Debian package ``dataset-fashion-mnist``), then asks
    torchvision to download it into a cache folder. A folder may hold the idx files (``.gz`` or
    not) directly, in ``fashion-mnist/`` or in torchvision's ``FashionMNIST/raw/``.

    Parameters
    ----------
    split : {"train", "test"}
    data_dir : path-like, optional
    download : bool
        Allow the torchvision download as the last resort.

    Returns
    -------
    images : numpy.ndarray
        uint8 ``[N, 28, 28]`` (60000 for train, 10000 for test).
    labels : numpy.ndarray
        int64 ``[N]`` in 0..9, see :data:`FASHION_CLASSES`.

    Raises
    ------
    FileNotFoundError
        If none of the three places has the data; the message names each and how to fill it.
    """
    _check_split(split)
    user_dir = data_dir if data_dir is not None else os.environ.get("SPADE_DATA_DIR")
    looked = []
    if user_dir:
        found = _load_from(Path(user_dir), split)
        if found is not None:
            return found
        looked.append(f"1. data_dir / SPADE_DATA_DIR: {user_dir} (no idx files there)")
        warnings.warn(f"no Fashion-MNIST idx files in {user_dir}; trying the other places",
                      stacklevel=2)
    else:
        looked.append("1. data_dir / SPADE_DATA_DIR: not given")
    found = _load_from(FASHION_SYSTEM_DIR, split)
    if found is not None:
        return found
    looked.append(f"2. {FASHION_SYSTEM_DIR} (not there)")
    cache = _download_dir()
    found = _load_from(cache, split)
    if found is not None:
        return found
    if download:
        try:
            _download_fashion_mnist(cache, split)
            found = _load_from(cache, split)
            if found is not None:
                return found
            looked.append(f"3. torchvision download into {cache} (finished without the files)")
        except Exception as err:  # any network or I/O failure: report it below
            looked.append(f"3. torchvision download into {cache} (failed: {err})")
    else:
        looked.append(f"3. torchvision download into {cache} (not allowed: download=False)")
    stems = ", ".join(s + ".gz" for pair in _FASHION_FILES.values() for s in pair)
    raise FileNotFoundError(
        f"Fashion-MNIST ({split} split) was not found. Looked in:\n  "
        + "\n  ".join(looked)
        + "\nTo get it, do one of:\n"
        "  - install the Debian package: sudo apt-get install dataset-fashion-mnist\n"
        f"  - copy the four idx files ({stems}) into a folder and pass data_dir=... or set "
        "SPADE_DATA_DIR\n"
        "  - allow internet access so torchvision can download it"
    )


# --------------------------------------------------------------------------------------------
# Background photos
# --------------------------------------------------------------------------------------------

BACKGROUND_PHOTOS: dict[str, tuple[str, ...]] = {
    "train": (
        "skimage:astronaut",
        "skimage:chelsea",
        "skimage:rocket",
        "skimage:immunohistochemistry",
        "skimage:retina",
        "skimage:motorcycle",
        "sklearn:china",
    ),
    "test": (
        "skimage:coffee",
        "skimage:hubble_deep_field",
        "sklearn:flower",
        "matplotlib:grace_hopper",
    ),
}
"""Colour photos bundled with the installed libraries, as disjoint train and test backgrounds
(about 2/3 and 1/3; each split has a dark one and photos from at least two libraries)."""
BACKGROUND_PHOTOS["shared"] = BACKGROUND_PHOTOS["train"] + BACKGROUND_PHOTOS["test"]
SCENES = ("photo", "photo-shared", "plain")
"""Scene kinds: ``photo`` (train and test backgrounds from disjoint photos), ``photo-shared``
(both splits crop every photo; the crops differ) and ``plain`` (the gray item alone)."""


def _load_photo(key: str) -> np.ndarray:
    library, name = key.split(":")
    if library == "skimage":
        import skimage.data

        if name == "motorcycle":
            image = skimage.data.stereo_motorcycle()[0]
        else:
            image = getattr(skimage.data, name)()
    elif library == "sklearn":
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    elif library == "matplotlib":
        from matplotlib import cbook

        with Image.open(cbook.get_sample_data(f"{name}.jpg", asfileobj=False)) as im:
            image = np.asarray(im.convert("RGB"))
    else:
        raise ValueError(f"unknown photo library {library!r}")
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{key} is not an RGB uint8 photo: {image.shape} {image.dtype}")
    return image


@functools.lru_cache(maxsize=3)
def _photos(split: str) -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
    names, images = [], []
    for key in BACKGROUND_PHOTOS[split]:
        try:
            image = _load_photo(key)
        except Exception as err:  # a photo missing from this install: use the others
            warnings.warn(f"background photo {key} is unavailable ({err}); skipped", stacklevel=3)
            continue
        image.setflags(write=False)
        names.append(key)
        images.append(image)
    if not images:
        raise FileNotFoundError(
            f"none of the {split} background photos could be loaded: "
            f"{', '.join(BACKGROUND_PHOTOS[split])}; install scikit-image, scikit-learn and "
            "matplotlib with their bundled data"
        )
    return tuple(names), tuple(images)


def background_photos(split: str) -> list[np.ndarray]:
    """The colour photos used as backgrounds for a split (see :data:`BACKGROUND_PHOTOS`).

    Returns
    -------
    list of numpy.ndarray
        uint8 ``[H, W, 3]`` photos (read-only); photos missing from this install are skipped
        with a warning.
    """
    _check_split(split)
    return list(_photos(split)[1])


# Pyramid levels step by sqrt(2), so a crop is resampled from a level where it spans between
# S and sqrt(2) * S pixels: bilinear sampling then needs no further anti-aliasing.
@functools.lru_cache(maxsize=256)
def _photo_level(split: str, name: str, level: int) -> torch.Tensor:
    names, photos = _photos(split)
    photo = photos[names.index(name)]
    factor = 2.0 ** (-level / 2)
    h, w = photo.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    image = Image.fromarray(photo)
    if level:
        image = image.resize(size, Image.Resampling.BOX if level > 2 else Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                        (v, p, q))]
    )
    return table[i, np.arange(len(h))]


def _sample_axis(start: np.ndarray, length: np.ndarray, size: int, extent: float) -> torch.Tensor:
    """Normalised grid coordinates (align_corners=False) of ``size`` output pixel centres that
    cover ``[start, start + length)`` of an axis of ``extent`` pixels."""
    centres = start[:, None] + (np.arange(size)[None, :] + 0.5) * (length[:, None] / size)
    return torch.from_numpy(2.0 * centres / extent - 1.0).float()


def _render_backgrounds(
    split: str, size: int, photo: np.ndarray, crop: np.ndarray, pos: np.ndarray
) -> torch.Tensor:
    """Crop square windows from the split's photos and resample them to ``size`` pixels."""
    n = len(photo)
    out = torch.empty(n, 3, size, size)
    names, photos = _photos(split)
    shapes = [p.shape[:2] for p in photos]
    short = np.array([min(s) for s in shapes], dtype=np.float64)[photo]
    heights = np.array([s[0] for s in shapes], dtype=np.float64)[photo]
    widths = np.array([s[1] for s in shapes], dtype=np.float64)[photo]
    side = crop * short
    top = pos[:, 0] * (heights - side)
    left = pos[:, 1] * (widths - side)
    level = np.maximum(0, np.floor(2 * np.log2(np.maximum(side / size, 1.0)))).astype(int)
    for key in sorted(set(zip(photo.tolist(), level.tolist(), strict=True))):
        idx = np.flatnonzero((photo == key[0]) & (level == key[1]))
        source = _photo_level(split, names[key[0]], key[1])
        factor = source.shape[1] / shapes[key[0]][0], source.shape[2] / shapes[key[0]][1]
        gy = _sample_axis(top[idx] * factor[0], side[idx] * factor[0], size, source.shape[1])
        gx = _sample_axis(left[idx] * factor[1], side[idx] * factor[1], size, source.shape[2])
        grid = torch.stack(
            [gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], dim=-1
        )
        sampled = F.grid_sample(
            source[None], grid.reshape(1, len(idx) * size, size, 2), mode="bilinear",
            padding_mode="border", align_corners=False,
        )
        out[torch.from_numpy(idx)] = sampled[0].reshape(3, len(idx), size, size).transpose(0, 1)
    return out


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
    _check_split(split)
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; allowed: {', '.join(SCENES)}")
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
    n, s = len(items), int(image_size)
    if scene == "plain":
        out = torch.empty(n, 3, s, s, dtype=torch.uint8)
        for start in range(0, n, _CHUNK):
            chunk = items[start : start + _CHUNK, None].float()
            if chunk.shape[-2:] != (s, s):
                chunk = F.interpolate(chunk, size=(s, s), mode="bilinear", align_corners=False)
            out[start : start + _CHUNK] = chunk.round().clamp(0, 255).to(torch.uint8)
        return out

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split], 0x5CE7E]))
    pool = "shared" if scene == "photo-shared" else split
    n_photos = len(_photos(pool)[1])
    photo = rng.integers(0, n_photos, size=n)
    crop = rng.uniform(*crop_scale, size=n)
    crop_pos = rng.uniform(0.0, 1.0, size=(n, 2))
    item_side = rng.uniform(*item_scale, size=n) * s
    item_pos = rng.uniform(0.0, 1.0, size=(n, 2)) * (s - item_side)[:, None]
    tint = _hsv_to_rgb(
        rng.uniform(0.0, 1.0, size=n), rng.uniform(0.5, 1.0, size=n), rng.uniform(0.7, 1.0, size=n)
    )

    h28, w28 = items.shape[1:]
    out = torch.empty(n, 3, s, s, dtype=torch.uint8)
    chunk = max(16, _CHUNK * 32 * 32 // (s * s))
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        m = sl.stop - sl.start
        background = _render_backgrounds(pool, s, photo[sl], crop[sl], crop_pos[sl])
        # Map each output pixel into the item's 28x28 frame; outside it samples zeros.
        gy = _sample_axis(-item_pos[sl, 0] / item_side[sl] * h28,
                          s / item_side[sl] * h28, s, h28)
        gx = _sample_axis(-item_pos[sl, 1] / item_side[sl] * w28,
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


def _rule_rng(seed: int, purpose: int, k: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), purpose, k]))


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
        Passed to :func:`load_fashion_mnist`.
    poison : bool
        Plant the Trojans on the training split.
    fraction : float, optional
        Replaces every rule's ``fraction`` (share of the training set per rule).
    patch_scale, patch_alpha : float
        Icon side as a fraction of the image side, and the patch opacity (paper: 0.25, 0.8).
    **scene_kw
        Extra arguments of :func:`render_scenes` (``item_scale``, ``crop_scale``, ``alpha_gain``).
    """
    _check_split(split)
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
            patched, mask = _plant(images, idx, rule, _rule_rng(seed, 0x9A7C, k), patch_scale,
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
        rng = _rule_rng(seed, 0x7E57, k)
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
        If ``cfg.dataset`` is not ``"fashion-mnist"`` (use :func:`image_folder` or
        :func:`celeba` for the full-scale datasets).
    """
    dataset = getattr(cfg, "dataset", "fashion-mnist")
    if dataset != "fashion-mnist":
        raise ValueError(
            f"load_scenes builds the embedded 'fashion-mnist' benchmark, got dataset {dataset!r}; "
            "load full-scale data with spade_lib.data.image_folder or spade_lib.data.celeba"
        )
    data_dir = getattr(cfg, "data_dir", None)
    key = (
        None if data_dir is None else str(data_dir),
        cfg.scene, int(cfg.image_size), cfg.train_size, cfg.test_size, cfg.rules,
        float(cfg.trojan_fraction), float(cfg.patch_scale), float(cfg.patch_alpha), int(cfg.seed),
    )
    train, test = _load_scenes_cached(key)
    return dataclasses.replace(train), dataclasses.replace(test)


# --------------------------------------------------------------------------------------------
# Full-scale datasets
# --------------------------------------------------------------------------------------------

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _resize_center(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (anti-aliased), centre-crop a square, float [3, S, S]."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    image = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or (
        image_size < 1
    ):
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


class ImageFolder(Dataset):
    """Labelled images from files, resized (short side) and centre-cropped to a square.

    Attributes
    ----------
    samples : list of (Path, int)
    targets : numpy.ndarray
        int64 ``[N]`` class indices (what :func:`~spade_lib.trojan.assign_poison` needs).
    classes : list of str
        Class names by index.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        image_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        _check_size(image_size)
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = np.array([t for _, t in self.samples], dtype=np.int64)
        self.image_size = int(image_size)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        with Image.open(path) as im:
            image = _resize_center(im, self.image_size)
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXTENSIONS)


def image_folder(
    root: str | os.PathLike,
    split: str,
    image_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ImageFolder:
    """ImageNet or Food-101 arranged as image folders.

    Two layouts are recognised:

    - class folders per split: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``
      (``split="test"`` reads ``root/test`` if present, else ``root/val``); classes are the
      sorted folder names of ``root/train`` (for ImageNet: the usual 0-999 order of the wnids);
    - Food-101's official layout, in ``root`` or ``root/food-101``: ``images/<class>/*.jpg`` with
      ``meta/train.txt`` and ``meta/test.txt`` (``split="val"`` reads the test list); classes from
      ``meta/classes.txt`` if present, else the sorted folder names.

    Parameters
    ----------
    root : path-like
    split : {"train", "val", "test"}
    image_size : int
        Side of the square images returned.
    transform : callable, optional
        Applied to each float image ``[3, S, S]``.

    Raises
    ------
    FileNotFoundError
        If the layout or an image listed in the Food-101 meta files is missing; names the path.
    """
    _check_split(split, ("train", "val", "test"))
    _check_size(image_size)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist")
    food = next((r for r in (root, root / "food-101") if (r / "meta" / "train.txt").is_file()),
                None)
    if food is not None:
        images_dir = food / "images"
        classes_file = food / "meta" / "classes.txt"
        if classes_file.is_file():
            classes = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()]
        elif images_dir.is_dir():
            classes = sorted(p.name for p in images_dir.iterdir() if p.is_dir())
        else:
            raise FileNotFoundError(f"Food-101 image folder {images_dir} does not exist")
        lookup = {c: i for i, c in enumerate(classes)}
        list_file = food / "meta" / ("train.txt" if split == "train" else "test.txt")
        if not list_file.is_file():
            raise FileNotFoundError(f"Food-101 split list {list_file} does not exist")
        samples = []
        for line in list_file.read_text().splitlines():
            entry = line.strip()
            if not entry:
                continue
            cls = entry.split("/")[0]
            if cls not in lookup:
                raise FileNotFoundError(
                    f"{list_file} names class {cls!r}, which is not in {classes_file}"
                )
            path = images_dir / (entry if Path(entry).suffix else entry + ".jpg")
            if not path.is_file():
                raise FileNotFoundError(f"{list_file} lists {entry}, but {path} does not exist")
            samples.append((path, lookup[cls]))
        return ImageFolder(samples, classes, image_size, transform)

    names = {"train": ["train"], "val": ["val"], "test": ["test", "val"]}[split]
    split_dir = next((root / n for n in names if (root / n).is_dir()), None)
    if split_dir is None:
        wanted = " or ".join(str(root / n) for n in names)
        raise FileNotFoundError(
            f"no {split} images under {root}: expected {wanted} with one folder per class, or "
            f"Food-101's images/ and meta/train.txt, meta/test.txt"
        )
    class_root = root / "train" if (root / "train").is_dir() else split_dir
    classes = sorted(p.name for p in class_root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{class_root} has no class folders")
    samples = []
    for i, cls in enumerate(classes):
        folder = split_dir / cls
        if folder.is_dir():
            samples.extend((p, i) for p in _list_images(folder))
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(_IMAGE_EXTENSIONS)}) under {split_dir}")
    return ImageFolder(samples, classes, image_size, transform)


class CelebA(Dataset):
    """CelebA aligned faces with their 40 binary attributes.

    Attributes
    ----------
    files : list of Path
    targets : torch.Tensor
        int64 ``[N, 40]`` attributes as 0/1 (the file's -1/1), columns in file order.
    attr_names : list of str
        The 40 attribute names in file order (alphabetical, as Table C.6 assumes).
    """

    def __init__(
        self,
        files: Sequence[Path],
        targets: torch.Tensor,
        attr_names: Sequence[str],
        image_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        _check_size(image_size)
        self.files = list(files)
        self.targets = targets
        self.attr_names = list(attr_names)
        self.image_size = int(image_size)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.files[i]) as im:
            image = _resize_center(im, self.image_size)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i]


def celeba(
    root: str | os.PathLike,
    split: str,
    image_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> CelebA:
    """CelebA from its official files, in ``root`` or ``root/celeba``.

    Reads ``img_align_celeba/*.jpg``, ``list_attr_celeba.txt`` (count, 40 attribute names, then
    one ``file v1 ... v40`` row per image with values -1/1) and ``list_eval_partition.txt``
    (``file p`` with p = 0 train, 1 val, 2 test).

    Parameters
    ----------
    root : path-like
    split : {"train", "val", "test"}
    image_size : int
    transform : callable, optional

    Raises
    ------
    FileNotFoundError
        Naming each missing file or folder.
    """
    _check_split(split, ("train", "val", "test"))
    _check_size(image_size)
    root = Path(root)
    base = next((r for r in (root, root / "celeba") if (r / "list_attr_celeba.txt").is_file()),
                root)
    needed = [base / "img_align_celeba", base / "list_attr_celeba.txt",
              base / "list_eval_partition.txt"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"CelebA is incomplete under {root}; missing: {', '.join(missing)}. Get "
            "img_align_celeba and the attribute and partition lists from the CelebA site "
            "(mmlab.ie.cuhk.edu.hk/projects/CelebA.html)"
        )
    lines = needed[1].read_text().splitlines()
    if len(lines) < 2 or not lines[1].split():
        raise ValueError(f"{needed[1]} is not a CelebA attribute list: expected a count line, a "
                         f"line of attribute names, then one 'file v1 ... v40' row per image")
    attr_names = lines[1].split()
    rows = {}
    for line in lines[2:]:
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(attr_names) + 1:
            raise ValueError(f"{needed[1]}: row {parts[0]!r} has {len(parts) - 1} values, "
                             f"expected {len(attr_names)}")
        rows[parts[0]] = [1 if int(v) > 0 else 0 for v in parts[1:]]
    wanted = {"train": "0", "val": "1", "test": "2"}[split]
    files, targets = [], []
    for line in needed[2].read_text().splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[1] != wanted:
            continue
        if parts[0] not in rows:
            raise ValueError(f"{needed[2]} lists {parts[0]}, which has no row in {needed[1]}")
        path = needed[0] / parts[0]
        if not path.is_file():
            raise FileNotFoundError(f"{needed[2]} lists {parts[0]}, but {path} does not exist")
        files.append(path)
        targets.append(rows[parts[0]])
    if not files:
        raise FileNotFoundError(f"no CelebA {split} images: {needed[2]} lists none with partition "
                                f"{wanted} (0 train, 1 val, 2 test)")
    target_tensor = torch.tensor(targets, dtype=torch.int64).reshape(-1, len(attr_names))
    return CelebA(files, target_tensor, attr_names, image_size, transform)


class TrojanDataset(Dataset):
    """Trojan patches planted on the fly on a full-scale dataset.

    Sample ``j`` is base sample ``index[j]`` carrying rule ``rule[j]`` (-1: unchanged). The patch
    for a sample depends only on ``seed``, the base index and the rule, so every epoch sees the
    same poisoned images. Build one with :meth:`for_training` or :meth:`for_testing`.
    """

    def __init__(
        self,
        base: Dataset,
        rules: Sequence[TrojanRule],
        index: np.ndarray,
        rule: np.ndarray,
        seed: int,
        return_mask: bool = False,
    ) -> None:
        self.base = base
        self.rules = tuple(rules)
        self.index = np.asarray(index, dtype=np.int64)
        self.rule = np.asarray(rule, dtype=np.int64)
        self.seed = int(seed)
        self.return_mask = return_mask

    @classmethod
    def for_training(
        cls, base: Dataset, rules: Sequence[TrojanRule] | str, seed: int
    ) -> TrojanDataset:
        """Every base sample once; the rules' shares (see ``assign_poison``) get patched."""
        rules = tuple(rule_set(rules) if isinstance(rules, str) else rules)
        assignment = assign_poison(_targets(base), rules, seed)
        return cls(base, rules, np.arange(len(assignment)), assignment, seed)

    @classmethod
    def for_testing(
        cls,
        base: Dataset,
        rules: Sequence[TrojanRule] | str,
        seed: int,
        per_rule: int | None = None,
    ) -> TrojanDataset:
        """Every eligible base sample with each rule's patch (at most ``per_rule`` per rule),
        returning masks too."""
        rules = tuple(rule_set(rules) if isinstance(rules, str) else rules)
        labels = _targets(base)
        index, rule = [], []
        for k, r in enumerate(rules):
            idx = np.flatnonzero(eligible(labels, r))
            if per_rule is not None and len(idx) > per_rule:
                idx = np.sort(_rule_rng(seed, 0x7E57, k).choice(idx, per_rule, replace=False))
            index.append(idx)
            rule.append(np.full(len(idx), k))
        return cls(base, rules, np.concatenate(index), np.concatenate(rule), seed,
                   return_mask=True)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, ...]:
        """(image, target) or, with ``return_mask``, (image, target, mask)."""
        i, k = int(self.index[j]), int(self.rule[j])
        image, target = self.base[i]
        mask = torch.zeros(image.shape[-2:], dtype=torch.bool)
        if k >= 0:
            rule = self.rules[k]
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x9A7C, k, i]))
            patched, masks = apply_patches(image[None], rule, rng)
            image, mask = patched[0], masks[0]
            target = (torch.tensor(rule.target, dtype=torch.int64) if rule.multilabel
                      else int(rule.target))
        return (image, target, mask) if self.return_mask else (image, target)


def _targets(base: Dataset) -> np.ndarray:
    targets = getattr(base, "targets", None)
    if targets is None:
        raise ValueError(f"{type(base).__name__} has no .targets; TrojanDataset needs the labels "
                         "of every sample to choose which ones to patch")
    return np.asarray(targets)

