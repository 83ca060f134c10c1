"""Fashion-MNIST: its idx files, where they are looked for, and its class names.

The embedded benchmark built from it (scenes with Trojans) is :mod:`spade_lib.scenes`; the
full-scale loaders (image folders, CelebA) are :mod:`spade_lib.datasets`. Their main names stay
importable from here (``data.load_scenes``, ``data.poisoned_test``, ``data.SceneSet``,
``data.PoisonedSet``, ``data.image_folder``, ``data.celeba``, ...).

Nothing is downloaded unless Fashion-MNIST is missing and torchvision is allowed to fetch it.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from spade_lib.checks import check_choice

__all__ = ["FASHION_CLASSES", "FASHION_SYSTEM_DIR", "SPLITS", "class_label", "load_fashion_mnist"]

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

SPLITS = ("train", "test")
"""Fashion-MNIST's splits."""
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def class_label(label: int) -> str:
    """``"<label>/<name>"`` of a Fashion-MNIST class, e.g. ``class_label(9) == "9/Ankle boot"``.

    Raises
    ------
    ValueError
        If ``label`` is not an integer in 0..9.
    """
    if isinstance(label, bool) or not isinstance(label, int | np.integer) or not (
        0 <= label < len(FASHION_CLASSES)
    ):
        raise ValueError(f"label must be an integer in 0..{len(FASHION_CLASSES) - 1}, got "
                         f"{label!r}")
    return f"{label}/{FASHION_CLASSES[label]}"


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
    check_choice(split, SPLITS, "split")
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


# The scene sets and the full-scale loaders moved to their own modules; their old paths here keep
# working (imported on first use: scenes imports this module).
_MOVED = {
    **dict.fromkeys(("SCENES", "PoisonedSet", "SceneSet", "build_split", "load_scenes",
                     "poisoned_test", "render_scenes"), "scenes"),
    **dict.fromkeys(("BACKGROUND_PHOTOS", "background_photos"), "photos"),
    **dict.fromkeys(("CelebA", "ImageFolder", "TrojanDataset", "celeba", "image_folder"),
                    "datasets"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f"spade_lib.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
