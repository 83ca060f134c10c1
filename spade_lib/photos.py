"""Background photos of the embedded scenes: which photos, loading them, and cropping them.

The photos are the ones bundled with scikit-image, scikit-learn and matplotlib, split into
disjoint train and test backgrounds (:data:`BACKGROUND_PHOTOS`); :func:`render_backgrounds` crops
square windows from them and resamples each from a pyramid level, so no further anti-aliasing is
needed. :mod:`spade_lib.scenes` composites the items onto them.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spade_lib.checks import check_choice

__all__ = ["BACKGROUND_PHOTOS", "background_photos", "photo_count", "render_backgrounds",
           "sample_axis"]

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
    check_choice(split, ("train", "test"), "split")
    return list(_photos(split)[1])


def photo_count(split: str) -> int:
    """How many photos the pool ``split`` (``"train"``, ``"test"``, ``"shared"``) has here."""
    return len(_photos(split)[1])


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


def sample_axis(start: np.ndarray, length: np.ndarray, size: int, extent: float) -> torch.Tensor:
    """Normalised grid coordinates (align_corners=False) of ``size`` output pixel centres that
    cover ``[start, start + length)`` of an axis of ``extent`` pixels."""
    centres = start[:, None] + (np.arange(size)[None, :] + 0.5) * (length[:, None] / size)
    return torch.from_numpy(2.0 * centres / extent - 1.0).float()


def render_backgrounds(
    split: str, size: int, photo: np.ndarray, crop: np.ndarray, pos: np.ndarray
) -> torch.Tensor:
    """Crop square windows from the split's photos and resample them to ``size`` pixels.

    Parameters
    ----------
    split, size
        The photo pool (``"train"``, ``"test"`` or ``"shared"``) and the output side in pixels.
    photo, crop, pos
        Per image ``[n]``: photo index, crop side as a fraction of the photo's short side, and
        ``[n, 2]`` the crop's position (top, left) as fractions of the free room.

    Returns
    -------
    torch.Tensor
        float ``[n, 3, size, size]`` in [0, 1].
    """
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
        gy = sample_axis(top[idx] * factor[0], side[idx] * factor[0], size, source.shape[1])
        gx = sample_axis(left[idx] * factor[1], side[idx] * factor[1], size, source.shape[2])
        grid = torch.stack(
            [gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], dim=-1
        )
        sampled = F.grid_sample(
            source[None], grid.reshape(1, len(idx) * size, size, 2), mode="bilinear",
            padding_mode="border", align_corners=False,
        )
        out[torch.from_numpy(idx)] = sampled[0].reshape(3, len(idx), size, size).transpose(0, 1)
    return out
