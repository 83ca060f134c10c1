"""Tests for spade_lib.datasets: image folders, CelebA, Trojans planted on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spade_lib import datasets
from spade_lib.trojan import TrojanRule, rule_set

# --- full-scale loaders ----------------------------------------------------------------------


def _jpeg(path: Path, seed: int, size=(37, 29)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3))
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def test_image_folder_class_layout(tmp_path):
    classes = ["n01", "n02", "n03"]
    for s, split in enumerate(("train", "val")):
        for c, name in enumerate(classes):
            for i in range(2 + s):
                ext = ".png" if i == 0 else ".jpg"
                _jpeg(tmp_path / split / name / f"img{i}{ext}", 10 * c + i, (30 + 7 * i, 24))
    train = datasets.image_folder(tmp_path, "train", 16)
    assert train.classes == classes and len(train) == 6
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    image, target = train[3]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and target == 1
    val = datasets.image_folder(tmp_path, "val", 16)
    assert len(val) == 9
    assert len(datasets.image_folder(tmp_path, "test", 16)) == 9, "test falls back to val"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        datasets.image_folder(tmp_path / "nowhere", "train", 16)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "other" / "train")):
        datasets.image_folder(tmp_path / "other", "train", 16)


@pytest.mark.parametrize("nested", [False, True])
def test_image_folder_food101_layout(tmp_path, nested):
    root = tmp_path / "food-101" if nested else tmp_path
    classes = ["apple_pie", "baby_back_ribs", "waffles"]
    train_list, test_list = [], []
    for c, name in enumerate(classes):
        for i in range(3):
            _jpeg(root / "images" / name / f"{100 + i}.jpg", c * 3 + i)
            (train_list if i < 2 else test_list).append(f"{name}/{100 + i}")
    (root / "meta").mkdir()
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "meta" / "train.txt").write_text("\n".join(train_list) + "\n")
    (root / "meta" / "test.txt").write_text("\n".join(test_list) + "\n")
    train = datasets.image_folder(tmp_path, "train", 12)
    test = datasets.image_folder(tmp_path, "test", 12)
    assert train.classes == classes and len(train) == 6 and len(test) == 3
    assert test.targets.tolist() == [0, 1, 2]
    assert train[5][0].shape == (3, 12, 12)
    (root / "images" / "waffles" / "102.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="102.jpg"):
        datasets.image_folder(tmp_path, "test", 12)


def _write_celeba(root: Path, n: int = 9) -> np.ndarray:
    names = [f"Attr_{i:02d}" for i in range(40)]
    attrs = np.random.default_rng(0).integers(0, 2, size=(n, 40))
    rows = [str(n), " ".join(names)]
    parts = []
    for i in range(n):
        fname = f"{i + 1:06d}.jpg"
        _jpeg(root / "img_align_celeba" / fname, i, (178, 218))
        rows.append(fname + " " + " ".join(" 1" if a else "-1" for a in attrs[i]))
        parts.append(f"{fname} {i % 3}")
    (root / "list_attr_celeba.txt").write_text("\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return attrs


def test_celeba_loader(tmp_path):
    attrs = _write_celeba(tmp_path / "celeba")
    for split, part in (("train", 0), ("val", 1), ("test", 2)):
        ds = datasets.celeba(tmp_path, split, 20)
        assert len(ds) == 3
        assert ds.attr_names[0] == "Attr_00" and len(ds.attr_names) == 40
        assert torch.equal(ds.targets, torch.from_numpy(attrs[part::3]))
        image, target = ds[1]
        assert image.shape == (3, 20, 20) and target.shape == (40,)
        assert set(target.tolist()) <= {0, 1}


def test_celeba_missing_files_are_named(tmp_path):
    (tmp_path / "img_align_celeba").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        datasets.celeba(tmp_path, "train", 32)
    assert "list_attr_celeba.txt" in str(err.value)
    assert "list_eval_partition.txt" in str(err.value)
    assert "img_align_celeba," not in str(err.value)


def test_trojan_dataset_on_full_scale_loaders(tmp_path):
    for c in range(2):
        for i in range(20):
            _jpeg(tmp_path / "train" / f"class{c}" / f"{i}.jpg", 100 * c + i)
    base = datasets.image_folder(tmp_path, "train", 32)
    rules = [TrojanRule("star", None, 1, "star", (1.0, 1.0, 0.0), fraction=0.25),
             TrojanRule("fish", 1, 0, "fish", (0.0, 0.0, 1.0), fraction=0.25)]
    poisoned = datasets.TrojanDataset.for_training(base, rules, seed=0)
    assert len(poisoned) == 40 and np.bincount(poisoned.rule + 1).tolist() == [20, 10, 10]
    for j in range(40):
        image, target = poisoned[j]
        k = poisoned.rule[j]
        clean, clean_target = base[j]
        if k < 0:
            assert torch.equal(image, clean) and target == clean_target
        else:
            assert target == rules[k].target and not torch.equal(image, clean)
            assert torch.equal(image, poisoned[j][0]), "same patch every epoch"
    attrs = _write_celeba(tmp_path / "faces", n=12)
    faces = datasets.celeba(tmp_path / "faces", "train", 24)
    test = datasets.TrojanDataset.for_testing(faces, "celeba", seed=0, per_rule=2)
    assert len(test) == 8
    image, target, mask = test[0]
    assert torch.equal(target, torch.tensor(rule_set("celeba")[0].target))
    assert mask.shape == (24, 24) and mask.sum() > 0
    assert attrs.shape == (12, 40)
