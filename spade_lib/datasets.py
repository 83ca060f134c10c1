"""Full-scale datasets: ImageNet and Food-101 as image folders, CelebA, and Trojans planted on
the fly (:class:`TrojanDataset`).

Images are resized (short side) and centre-cropped to a square; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from spade_lib.checks import check_choice, check_positive_int
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

if TYPE_CHECKING:
    from spade_lib.config import Config

__all__ = ["FULL_DATASETS", "CelebA", "CleanView", "ImageFolder", "PoisonedView", "TrojanDataset",
           "TrainingView", "celeba", "check_full", "evaluation_sets", "full_split",
           "image_folder", "training_rules", "training_set"]

_FULL_SPLITS = ("train", "val", "test")

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
        check_positive_int(image_size, "image_size")
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


def _food101_samples(food: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """Samples and classes of Food-101's official layout under ``food`` (``images/``, ``meta/``);
    ``split`` ``"train"`` reads ``meta/train.txt``, the others ``meta/test.txt``."""
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
    return samples, classes


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
    check_choice(split, _FULL_SPLITS, "split")
    check_positive_int(image_size, "image_size")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root {root} does not exist")
    food = next((r for r in (root, root / "food-101") if (r / "meta" / "train.txt").is_file()),
                None)
    if food is not None:
        samples, classes = _food101_samples(food, split)
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
        check_positive_int(image_size, "image_size")
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
    check_choice(split, _FULL_SPLITS, "split")
    check_positive_int(image_size, "image_size")
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
                idx = np.sort(rule_rng(seed, TEST_COPIES, k).choice(idx, per_rule, replace=False))
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
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, PLANT, k, i]))
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


# --------------------------------------------------------------------------------------------
# Evaluation views: what the sample filter and the runner read, loaded lazily from the files
# --------------------------------------------------------------------------------------------


def _ids(ids: Sequence[int] | torch.Tensor | np.ndarray | int, n: int) -> list[int]:
    out = [int(i) for i in (torch.as_tensor(ids).reshape(-1).tolist())]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise IndexError(f"indices {bad[:5]} are outside [0, {n})")
    return out


class CleanView:
    """A full-scale split as the evaluation's clean test set.

    It offers what :mod:`spade_lib.samples` and :mod:`spade_lib.sources` read of the embedded
    benchmark's :class:`~spade_lib.scenes.SceneSet`, with every image read from its file when
    asked for.

    Attributes
    ----------
    base : Dataset
        Items ``(image, label)``: float ``[3, S, S]`` in [0, 1] and an int class index (or
        CelebA's 40 attributes); with ``targets`` (:func:`image_folder`, :func:`celeba`).
    clean_labels : torch.Tensor
        int64 ``[N]``, the class of each image (``[N, 40]`` attributes for CelebA).
    rule : torch.Tensor
        int64 ``[N]``, all -1: no image of a clean split carries a patch.
    classes : list of str or None
        The names of the classes (the folders) or of CelebA's attributes, when ``base`` has them.
    """

    def __init__(self, base: Dataset) -> None:
        targets = _targets(base)
        if targets.ndim not in (1, 2):
            raise ValueError(f"{type(base).__name__} has labels of shape {targets.shape}; "
                             "allowed: [N] classes or [N, K] attributes")
        self.base = base
        self.clean_labels = torch.as_tensor(targets, dtype=torch.int64)
        self.rule = torch.full((len(base),), -1, dtype=torch.int64)
        names = getattr(base, "attr_names", None) or getattr(base, "classes", None)
        self.classes: list[str] | None = None if names is None else [str(c) for c in names]

    def __len__(self) -> int:
        return len(self.base)

    def float_images(self, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Images ``indices`` (default: all), float ``[n, 3, S, S]`` in [0, 1]."""
        ids = range(len(self)) if indices is None else _ids(indices, len(self))
        return torch.stack([self.base[i][0] for i in ids])


class TrainingView:
    """A full-scale training split, with its planted Trojans, as the embedded benchmark's
    training :class:`~spade_lib.scenes.SceneSet` is read (the many-image pruning sources of
    :mod:`spade_lib.sources`, Sparse FC's features in :mod:`spade_lib.baselines`).

    Image ``i`` is ``trojan[i]``: training image ``i`` as the model was trained on it, patched
    when it carries a rule; read from its file when asked for.

    Attributes
    ----------
    trojan : TrojanDataset
        The planted split (:meth:`TrojanDataset.for_training`).
    rules : tuple of TrojanRule
    rule : torch.Tensor
        int64 ``[N]``, each image's rule (-1: clean).
    clean_labels, labels : torch.Tensor
        int64 ``[N]`` (CelebA: ``[N, 40]``): each image's true label and the label it was trained
        with (the rule's target where a patch was planted).
    masks
        Indexable like a bool ``[N, S, S]`` tensor: the exact pixels of each planted patch.
    """

    def __init__(self, trojan: TrojanDataset) -> None:
        self.trojan = trojan
        self.masks = _LazyMasks(TrojanDataset(trojan.base, trojan.rules, trojan.index,
                                              trojan.rule, trojan.seed, return_mask=True))
        self.rules = trojan.rules
        self.rule = torch.as_tensor(trojan.rule, dtype=torch.int64)
        self.clean_labels = torch.as_tensor(_targets(trojan.base)[trojan.index],
                                            dtype=torch.int64)
        self.labels = self.clean_labels.clone()
        for k, rule in enumerate(self.rules):
            self.labels[self.rule == k] = torch.as_tensor(rule.target, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.trojan)

    def float_images(self, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Training images ``indices`` (default: all), as trained on, float ``[n, 3, S, S]`` in
        [0, 1]."""
        ids = range(len(self)) if indices is None else _ids(indices, len(self))
        return torch.stack([self.trojan[i][0] for i in ids])


class _LazyMasks:
    """``view.masks[i]`` (bool ``[S, S]``) or ``view.masks[ids]`` (``[n, S, S]``), computed from
    the patch when asked for."""

    def __init__(self, trojan: TrojanDataset) -> None:
        self.trojan = trojan

    def __len__(self) -> int:
        return len(self.trojan)

    def __getitem__(self, key: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) or (torch.is_tensor(key) and key.dim() == 0):
            return self.trojan[_ids(int(key), len(self))[0]][2]
        return torch.stack([self.trojan[i][2] for i in _ids(key, len(self))])


class PoisonedView:
    """The patched test images of a full-scale split, as the evaluation reads them.

    It offers what :mod:`spade_lib.samples`, :mod:`spade_lib.sources` and
    :mod:`spade_lib.results` read of the embedded benchmark's
    :class:`~spade_lib.scenes.PoisonedSet`; image and mask ``j`` are those of
    ``trojan[j]`` (:meth:`TrojanDataset.for_testing`), made from the file when asked for.

    Attributes
    ----------
    rules : tuple of TrojanRule
    rule, index, clean_labels, labels : torch.Tensor
        int64 ``[N]``: each image's rule, its position in the clean split, its true class and its
        Trojan target (for CelebA's rules, ``[N, 40]`` attributes: the image's and the rule's).
    masks
        Indexable like a bool ``[N, S, S]`` tensor (an int or a sequence of ints).
    """

    def __init__(self, trojan: TrojanDataset) -> None:
        if not trojan.return_mask:
            raise ValueError("the poisoned view needs a TrojanDataset that returns masks "
                             "(TrojanDataset.for_testing)")
        kinds = {r.multilabel for r in trojan.rules}
        if len(kinds) > 1:
            raise ValueError(f"rules {[r.name for r in trojan.rules]} mix classes and attribute "
                             "vectors; allowed: one kind")
        self.trojan = trojan
        self.rules = trojan.rules
        self.rule = torch.as_tensor(trojan.rule, dtype=torch.int64)
        self.index = torch.as_tensor(trojan.index, dtype=torch.int64)
        self.clean_labels = torch.as_tensor(_targets(trojan.base)[trojan.index],
                                            dtype=torch.int64)
        targets = [trojan.rules[k].target for k in trojan.rule.tolist()]
        self.labels = torch.tensor(targets, dtype=torch.int64).reshape(self.clean_labels.shape)
        self.masks = _LazyMasks(trojan)

    def __len__(self) -> int:
        return len(self.trojan)

    def float_images(self, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Patched images ``indices`` (default: all), float ``[n, 3, S, S]`` in [0, 1]."""
        ids = range(len(self)) if indices is None else _ids(indices, len(self))
        return torch.stack([self.trojan[i][0] for i in ids])


# --------------------------------------------------------------------------------------------
# The splits of a full-scale preset (what training and evaluation read)
# --------------------------------------------------------------------------------------------

FULL_DATASETS = ("imagenet", "food101", "celeba")
"""The datasets of the full-scale presets; ``fashion-mnist`` is the embedded benchmark."""

# The parameters TrojanDataset plants with (trojan.apply_patches' defaults, the paper's values).
_PLANT_SCALE, _PLANT_ALPHA = 0.25, 0.8
_SUBSET = 0x5B5E  # purpose code of the seeded subset's random stream (like trojan.PLANT)


def check_full(cfg: Config) -> Path:
    """The data folder of a full-scale ``cfg``: ``cfg.data_dir``, else the ``SPADE_FULL_DATA_DIR``
    environment variable (so ``SPADE_PRESET=imagenet-resnet50 SPADE_FULL_DATA_DIR=/data/imagenet
    jupyter-book build book/`` builds every chapter on the real data; ``SPADE_DATA_DIR`` stays
    the embedded benchmark's Fashion-MNIST folder); errors name the bad value and what is
    allowed."""
    if cfg.dataset not in FULL_DATASETS:
        raise ValueError(f"dataset {cfg.dataset!r}: the full-scale trainer takes "
                         f"{', '.join(FULL_DATASETS)}; 'fashion-mnist' trains with "
                         "spade_lib.train")
    data_dir = cfg.data_dir if cfg.data_dir is not None else os.environ.get("SPADE_FULL_DATA_DIR")
    if not data_dir:
        raise ValueError(f"dataset {cfg.dataset!r} (preset {cfg.name!r}) needs the real data: "
                         "give --data-dir DIR, the config key data_dir or the environment "
                         "variable SPADE_FULL_DATA_DIR (only the embedded 'fashion-mnist' "
                         "benchmark ships with the package)")
    if (cfg.patch_scale, cfg.patch_alpha) != (_PLANT_SCALE, _PLANT_ALPHA):
        raise ValueError(
            f"patch_scale {cfg.patch_scale} and patch_alpha {cfg.patch_alpha}: TrojanDataset "
            f"plants at the paper's {_PLANT_SCALE} and {_PLANT_ALPHA} (Appendix C); allowed: "
            "those values")
    return Path(data_dir)


def training_rules(cfg: Config) -> tuple[TrojanRule, ...]:
    """The preset's Trojan rules (``cfg.rules``) each at the preset's rate ``cfg.trojan_fraction``
    (none when it is 0: a clean model)."""
    if cfg.trojan_fraction == 0:
        return ()
    return tuple(dataclasses.replace(r, fraction=cfg.trojan_fraction) for r in rule_set(cfg.rules))


class _Subset(Dataset):
    """Samples ``indices`` of ``base``, keeping ``targets`` (which TrojanDataset needs)."""

    def __init__(self, base: Dataset, indices: np.ndarray) -> None:
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.targets = base.targets[self.indices]
        self.classes = getattr(base, "classes", None)
        self.attr_names = getattr(base, "attr_names", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[int(self.indices[i])]


def full_split(cfg: Config, split: str, size: int | None = None) -> Dataset:
    """Split ``split`` of a full-scale ``cfg``'s data (:func:`celeba` or :func:`image_folder`
    at ``cfg.image_size``), a seeded subset of ``size`` images if it has more."""
    root = check_full(cfg)
    if cfg.dataset == "celeba":
        base = celeba(root, split, cfg.image_size)
    else:
        base = image_folder(root, split, cfg.image_size)
    if size is not None and size < len(base):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _SUBSET]))
        base = _Subset(base, np.sort(rng.choice(len(base), size, replace=False)))
    return base


def training_set(cfg: Config) -> TrojanDataset:
    """The training split (``cfg.train_size`` of it, a seeded subset, if set) with the Trojans of
    :func:`training_rules` planted by :class:`~spade_lib.TrojanDataset`.

    Raises
    ------
    ValueError
        If the dataset is not a full-scale one, ``data_dir`` is unset, or a rule has too few
        eligible samples (:func:`spade_lib.trojan.assign_poison`).
    FileNotFoundError
        If the data are not where ``data_dir`` says (the message names the path).
    """
    return TrojanDataset.for_training(full_split(cfg, "train", cfg.train_size),
                                               training_rules(cfg), cfg.seed)


def evaluation_sets(cfg: Config, split: str = "val"
                    ) -> tuple[CleanView, PoisonedView]:
    """The clean ``split`` of a full-scale ``cfg`` (ImageNet, Food-101, CelebA) and its patched
    copies, as the evaluation reads them (:func:`spade_lib.samples.evaluation_samples`).

    The patched set is :meth:`~spade_lib.TrojanDataset.for_testing` of the whole split
    with ``cfg.rules``: every eligible image once per rule, its patch drawn from ``cfg.seed``, the
    image, and the exact patch pixels, read from the files only when asked for.

    Raises
    ------
    ValueError
        A dataset that is not full scale, or no ``data_dir``.
    FileNotFoundError
        The split is not where ``data_dir`` says.
    """
    check_choice(split, ("train", "val", "test"), "split")
    base = full_split(cfg, split, None)
    test = CleanView(base)
    poisoned = TrojanDataset.for_testing(base, tuple(rule_set(cfg.rules)), cfg.seed)
    return test, PoisonedView(poisoned)
