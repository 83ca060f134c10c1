"""A small Fashion-MNIST look-alike written as idx files, shared by the data and scene tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from spade_lib import data

N_TRAIN, N_TEST = 800, 200




def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    blob = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def fake_items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items shaped like Fashion-MNIST: a bright blob of random shape, balanced labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(10, 18, 2)
        ry, rx = rng.uniform(5, 12, 2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        images[i][inside] = rng.integers(80, 256, size=inside.sum())
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    return images, labels


def write_fashion(folder: Path, compress: bool = True) -> dict[str, tuple[np.ndarray, ...]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        images, labels = fake_items(n, seed)
        stem_images, stem_labels = data._FASHION_FILES[split]
        write_idx(folder / stem_images, images, compress)
        write_idx(folder / stem_labels, labels, compress)
        out[split] = (images, labels)
    return out
