"""Synthetic stand-ins for the full-scale datasets, in their official file layouts.

Built from photos bundled with scikit-image, so nothing is downloaded: an ImageNet-style folder
(``train/<class>/*.png``, ``val/<class>/*.png``) of two classes and a CelebA folder
(``img_align_celeba/``, ``list_attr_celeba.txt``, ``list_eval_partition.txt``). The tests of
:mod:`spade_lib.train_full` and the whole-book test use them;
``python tests/synthetic_data.py DIR`` writes both under ``DIR`` for a manual run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes "
    "No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling "
    "Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young").split()


def crops(photos, n: int, side: int, seed: int) -> list[np.ndarray]:
    """``n`` random ``side``-pixel crops (uint8 HWC), cycling through ``photos``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        out.append(np.ascontiguousarray(photo[top:top + side, left:left + side, :3]))
    return out


def image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """ImageNet's layout under ``root``, ``per_class[split]`` images per class and split: class
    ``n0`` cut from the cat and coffee photos, class ``n1`` from the astronaut and the rocket,
    64 px crops of the photos shrunk to 128 px on the short side."""
    sources = {"n0": (skimage.data.chelsea(), skimage.data.coffee()),
               "n1": (skimage.data.astronaut(), skimage.data.rocket())}
    for c, (name, photos) in enumerate(sources.items()):
        small = []
        for p in photos:
            im = Image.fromarray(p)
            scale = 128 / min(im.size)
            small.append(np.asarray(im.resize((round(im.width * scale),
                                                round(im.height * scale)))))
        for s, (split, n) in enumerate(per_class.items()):
            for i, crop in enumerate(crops(small, n, 64, seed=10 * c + s)):
                path = root / split / name / f"{name}_{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(crop).save(path)
    return root


def celeba_folder(root: Path, split_sizes: tuple[int, int, int] = (16, 4, 4)) -> np.ndarray:
    """CelebA's official layout under ``root``: ``img_align_celeba/000001.jpg...``,
    ``list_attr_celeba.txt`` (count, the 40 names, ``file`` then -1/1 per attribute) and
    ``list_eval_partition.txt`` (0 train, 1 val, 2 test), ``split_sizes`` images per split
    (44 x 54, CelebA's aspect). Returns the attributes drawn, 0/1 ``[n, 40]``."""
    photos = (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee())
    n = sum(split_sizes)
    attrs = np.random.default_rng(1).integers(0, 2, size=(n, 40))
    bounds = np.cumsum(split_sizes)
    rows, parts = [str(n), " ".join(CELEBA_ATTRIBUTES)], []
    for i, crop in enumerate(crops(photos, n, 200, seed=5)):
        name = f"{i + 1:06d}.jpg"
        path = root / "img_align_celeba" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).resize((44, 54)).save(path, quality=90)
        rows.append(name + " " + " ".join(" 1" if a else "-1" for a in attrs[i]))
        parts.append(f"{name} {int(np.searchsorted(bounds, i, side='right'))}")
    (root / "list_attr_celeba.txt").write_text("\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return attrs


if __name__ == "__main__":
    out = Path(sys.argv[1])
    image_folder(out / "folder", {"train": 64, "val": 8})
    celeba_folder(out / "celeba", (48, 12, 12))
    print(f"wrote {out / 'folder'} and {out / 'celeba'}")
