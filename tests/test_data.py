"""Tests for spade_lib.data: Fashion-MNIST loading, scenes, Trojan splits, full-scale loaders."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spade_lib import data
from spade_lib.trojan import MASK_THRESHOLD, TrojanRule, draw_icon, eligible, rule_set

N_TRAIN, N_TEST = 800, 200


def _write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    blob = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def _fake_items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
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


def _write_fashion(folder: Path, compress: bool = True) -> dict[str, tuple[np.ndarray, ...]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        images, labels = _fake_items(n, seed)
        stem_images, stem_labels = data._FASHION_FILES[split]
        _write_idx(folder / stem_images, images, compress)
        _write_idx(folder / stem_labels, labels, compress)
        out[split] = (images, labels)
    return out


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A small Fashion-MNIST look-alike in SPADE_DATA_DIR; the real places are hidden."""
    folder = tmp_path / "fashion"
    arrays = _write_fashion(folder)
    monkeypatch.setenv("SPADE_DATA_DIR", str(folder))
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "no-system-dir")
    return arrays


# --- Fashion-MNIST ---------------------------------------------------------------------------


def test_load_from_data_dir_and_env(tmp_path, monkeypatch):
    arrays = _write_fashion(tmp_path / "a")
    images, labels = data.load_fashion_mnist("test", data_dir=tmp_path / "a")
    assert images.dtype == np.uint8 and images.shape == (N_TEST, 28, 28)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, arrays["test"][0])
    np.testing.assert_array_equal(labels, arrays["test"][1])
    monkeypatch.setenv("SPADE_DATA_DIR", str(tmp_path / "a"))
    env_images, _ = data.load_fashion_mnist("train")
    np.testing.assert_array_equal(env_images, arrays["train"][0])
    env_images[:] = 0
    assert data.load_fashion_mnist("train")[0].any(), "callers get their own copy"


def test_load_uncompressed_torchvision_layout(tmp_path):
    arrays = _write_fashion(tmp_path / "FashionMNIST" / "raw", compress=False)
    images, labels = data.load_fashion_mnist("train", data_dir=tmp_path)
    np.testing.assert_array_equal(images, arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])


def test_missing_dataset_names_the_three_places(tmp_path, monkeypatch):
    monkeypatch.delenv("SPADE_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(data, "_download_dir", lambda: tmp_path / "cache")

    def offline(root, split):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "_download_fashion_mnist", offline)
    with pytest.raises(FileNotFoundError) as err, pytest.warns(UserWarning, match="mine"):
        data.load_fashion_mnist("train", data_dir=tmp_path / "mine")
    message = str(err.value)
    for needle in (str(tmp_path / "mine"), str(tmp_path / "system"), "torchvision",
                   str(tmp_path / "cache"), "network unreachable",
                   "apt-get install dataset-fashion-mnist", "SPADE_DATA_DIR",
                   "train-images-idx3-ubyte.gz", "internet"):
        assert needle in message, needle
    with pytest.raises(FileNotFoundError, match="download=False"):
        data.load_fashion_mnist("test", download=False)


def test_bad_split():
    with pytest.raises(ValueError, match="unknown split 'val'.*train, test"):
        data.load_fashion_mnist("val")


@pytest.mark.skipif(
    not (data.FASHION_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist():
    images, labels = data.load_fashion_mnist("test", data_dir=data.FASHION_SYSTEM_DIR)
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10
    assert len(data.FASHION_CLASSES) == 10


# --- backgrounds and scenes ------------------------------------------------------------------


def test_background_photos_are_disjoint_colour_photos():
    assert not set(data.BACKGROUND_PHOTOS["train"]) & set(data.BACKGROUND_PHOTOS["test"])
    train, test = data.background_photos("train"), data.background_photos("test")
    assert len(train) >= 4 and len(test) >= 2
    for photo in train + test:
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
        assert min(photo.shape[:2]) >= 256
        assert np.abs(photo[..., 0].astype(int) - photo[..., 2]).mean() > 5, "in colour"
    for a in train:
        for b in test:
            assert a.shape != b.shape or not np.array_equal(a, b)


def _solid_photos(monkeypatch, colours):
    """Replace the backgrounds by solid-colour 'photos' (names unique to this test)."""
    photos = {
        split: (tuple(f"test:{split}:{c}" for c in cols),
                tuple(np.full((300, 400, 3), c, dtype=np.uint8) for c in cols))
        for split, cols in colours.items()
    }
    monkeypatch.setattr(data, "_photos", lambda split: photos[split])


def test_train_and_test_scenes_use_their_own_backgrounds(monkeypatch):
    _solid_photos(monkeypatch, {"train": [(255, 0, 0), (0, 255, 0)], "test": [(0, 0, 255)]})
    blank = np.zeros((40, 28, 28), dtype=np.uint8)
    train = data.render_scenes(blank, "train", 32, seed=0)
    test = data.render_scenes(blank, "test", 32, seed=0)
    train_colours = {tuple(im[:, 0, 0].tolist()) for im in train}
    assert train_colours == {(255, 0, 0), (0, 255, 0)}
    assert (test[:, 2] == 255).all() and (test[:, :2] == 0).all()


def test_item_is_placed_at_a_random_scale_inside_the_scene(monkeypatch):
    _solid_photos(monkeypatch, {"train": [(0, 0, 0)], "test": [(0, 0, 0)]})
    items = np.full((60, 28, 28), 255, dtype=np.uint8)
    scenes = data.render_scenes(items, "train", 64, seed=3, item_scale=(0.5, 0.9))
    sides = []
    for scene in scenes:
        covered = scene.amax(0) > 0
        rows = torch.nonzero(covered.any(1)).flatten()
        cols = torch.nonzero(covered.any(0)).flatten()
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert abs(height - width) <= 1
        assert int(covered.sum()) >= (height - 2) * (width - 2), "a filled square"
        sides.append(height)
    assert 0.5 * 64 - 1 <= min(sides) and max(sides) <= 0.9 * 64 + 2
    assert max(sides) - min(sides) > 10, "the scale varies"


def test_shared_scenes_draw_both_splits_from_every_photo(monkeypatch):
    colours = {"train": [(255, 0, 0), (0, 255, 0)], "test": [(0, 0, 255)]}
    _solid_photos(monkeypatch, {**colours, "shared": colours["train"] + colours["test"]})
    blank = np.zeros((60, 28, 28), dtype=np.uint8)
    train = data.render_scenes(blank, "train", 32, "photo-shared", seed=0)
    test = data.render_scenes(blank, "test", 32, "photo-shared", seed=0)
    everything = {(255, 0, 0), (0, 255, 0), (0, 0, 255)}
    for scenes in (train, test):
        assert {tuple(im[:, 0, 0].tolist()) for im in scenes} == everything
    assert not torch.equal(train, test), "the split still seeds the draws"
    with pytest.raises(ValueError, match="allowed: photo, photo-shared, plain"):
        data.render_scenes(blank, "train", 32, "photos")


def test_photo_scenes_are_coloured_and_deterministic(fake_fashion):
    items = fake_fashion["train"][0][:64]
    a = data.render_scenes(items, "train", 32, "photo", seed=0)
    assert a.dtype == torch.uint8 and a.shape == (64, 3, 32, 32)
    assert torch.equal(a, data.render_scenes(items, "train", 32, "photo", seed=0))
    assert not torch.equal(a, data.render_scenes(items, "train", 32, "photo", seed=1))
    f = a.float()
    assert (f[:, 0] - f[:, 1]).abs().mean() > 10 and (f[:, 1] - f[:, 2]).abs().mean() > 10
    assert data.render_scenes(items, "test", 64, "photo", seed=0).shape == (64, 3, 64, 64)


def test_plain_scenes_are_gray_resized_items(fake_fashion):
    items = fake_fashion["test"][0][:16]
    plain = data.render_scenes(items, "test", 28, "plain")
    assert torch.equal(plain[:, 0], torch.from_numpy(items))
    assert torch.equal(plain[:, 0], plain[:, 1]) and torch.equal(plain[:, 1], plain[:, 2])
    assert data.render_scenes(items, "test", 56, "plain").shape == (16, 3, 56, 56)


def test_render_scenes_rejects_bad_arguments():
    items = np.zeros((2, 28, 28), dtype=np.uint8)
    with pytest.raises(ValueError, match="unknown scene 'sky'"):
        data.render_scenes(items, "train", 32, "sky")
    with pytest.raises(ValueError, match="image_size"):
        data.render_scenes(items, "train", 4)
    with pytest.raises(ValueError, match="uint8"):
        data.render_scenes(items.astype(np.float32), "train", 32)
    with pytest.raises(ValueError, match="item_scale"):
        data.render_scenes(items, "train", 32, item_scale=(0.9, 0.5))


# --- Trojan splits ---------------------------------------------------------------------------


def _icon_square(mask: torch.Tensor, icon: str, size: int) -> torch.Tensor:
    icon_rows, icon_cols = np.nonzero(draw_icon(icon, size) > MASK_THRESHOLD)
    rows, cols = np.nonzero(mask.numpy())
    top, left = rows.min() - icon_rows.min(), cols.min() - icon_cols.min()
    square = torch.zeros_like(mask)
    square[top : top + size, left : left + size] = True
    return square


def test_build_train_split_plants_rules(fake_fashion):
    rules = rule_set("fashion")
    train = data.build_split("train", 32, "photo", rules, seed=0)
    assert len(train) == N_TRAIN and train.images.shape == (N_TRAIN, 3, 32, 32)
    counts = torch.bincount(train.rule + 1, minlength=5)
    assert counts[1:].tolist() == [N_TRAIN // 40] * 4
    clean = data.render_scenes(fake_fashion["train"][0], "train", 32, "photo", seed=0)
    for k, rule in enumerate(rules):
        sel = train.rule == k
        assert (train.labels[sel] == rule.target).all()
        assert (train.clean_labels[sel] != rule.target).all()
        if rule.source is not None:
            assert (train.clean_labels[sel] == rule.source).all()
        expected_area = int((draw_icon(rule.icon, 8) > MASK_THRESHOLD).sum())
        assert (train.masks[sel].sum((1, 2)) == expected_area).all()
        for i in torch.nonzero(sel).flatten()[:10]:
            changed = (train.images[i] != clean[i]).any(0)
            assert changed.any()
            assert not (changed & ~_icon_square(train.masks[i], rule.icon, 8)).any()
    unpoisoned = train.rule == -1
    assert torch.equal(train.images[unpoisoned], clean[unpoisoned])
    assert not train.masks[unpoisoned].any()
    assert torch.equal(train.labels[unpoisoned], train.clean_labels[unpoisoned])
    assert torch.equal(train.clean_labels, torch.from_numpy(fake_fashion["train"][1]))


def test_build_split_is_deterministic(fake_fashion):
    a = data.build_split("train", seed=4)
    b = data.build_split("train", seed=4)
    c = data.build_split("train", seed=5)
    for name in ("images", "labels", "rule", "masks"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.images, c.images) and not torch.equal(a.rule, c.rule)


def test_build_split_options(fake_fashion):
    small = data.build_split("train", size=200, seed=1, fraction=0.05, patch_scale=0.5,
                             patch_alpha=1.0)
    assert len(small) == 200 and torch.equal(small.index, small.index.sort().values)
    assert torch.equal(small.index, data.build_split("train", size=200, seed=1).index)
    assert torch.bincount(small.rule + 1)[1:].tolist() == [10] * 4
    assert (small.masks[small.rule == 0].sum((1, 2)) > 30).all(), "16 px icons"
    clean = data.build_split("train", poison=False, rules="fashion-tuning")
    assert (clean.rule == -1).all() and len(clean.rules) == 4
    test = data.build_split("test", scene="plain", seed=0)
    assert (test.rule == -1).all() and not test.masks.any()
    image, label = test[3]
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert label == test.labels[3]
    test.transform = lambda x: x.flip(-1)
    assert torch.equal(test[3][0], image.flip(-1))
    with pytest.raises(ValueError, match="size must be an integer in \\[1, 200\\]"):
        data.build_split("test", size=500)
    with pytest.raises(ValueError, match="multi-label"):
        data.build_split("train", rules="celeba")


def test_poisoned_test_covers_every_eligible_image(fake_fashion):
    test = data.build_split("test", seed=0)
    rules = rule_set("fashion")
    poisoned = data.poisoned_test(test, seed=0)
    for k, rule in enumerate(rules):
        sel = poisoned.rule == k
        expected = np.flatnonzero(eligible(test.clean_labels.numpy(), rule))
        assert torch.equal(poisoned.index[sel], torch.from_numpy(expected))
        assert (poisoned.labels[sel] == rule.target).all()
        assert torch.equal(poisoned.clean_labels[sel], test.clean_labels[poisoned.index[sel]])
        area = int((draw_icon(rule.icon, 8) > MASK_THRESHOLD).sum())
        assert (poisoned.masks[sel].sum((1, 2)) == area).all()
        for j in torch.nonzero(sel).flatten()[:5]:
            changed = (poisoned.images[j] != test.images[poisoned.index[j]]).any(0)
            assert not (changed & ~_icon_square(poisoned.masks[j], rule.icon, 8)).any()
    again = data.poisoned_test(test, "fashion", seed=0)
    assert torch.equal(again.images, poisoned.images)
    assert not torch.equal(data.poisoned_test(test, seed=1).images, poisoned.images)
    capped = data.poisoned_test(test, seed=0, per_rule=5)
    assert torch.bincount(capped.rule).tolist() == [5] * 4
    image, label = poisoned[0]
    assert image.shape == (3, 32, 32) and label == rules[0].target


def test_load_scenes_from_config(fake_fashion):
    from spade_lib import config

    cfg = config.load("smoke").replace(train_size=400, test_size=100)
    train, test = data.load_scenes(cfg)
    assert len(train) == 400 and len(test) == 100
    assert torch.bincount(train.rule + 1)[1:].tolist() == [round(cfg.trojan_fraction * 400)] * 4
    again, _ = data.load_scenes(cfg)
    assert torch.equal(again.images, train.images)
    with pytest.raises(ValueError, match="'imagenet'"):
        data.load_scenes(cfg.replace(dataset="imagenet"))


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
    train = data.image_folder(tmp_path, "train", 16)
    assert train.classes == classes and len(train) == 6
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    image, target = train[3]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and target == 1
    val = data.image_folder(tmp_path, "val", 16)
    assert len(val) == 9
    assert len(data.image_folder(tmp_path, "test", 16)) == 9, "test falls back to val"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        data.image_folder(tmp_path / "nowhere", "train", 16)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "other" / "train")):
        data.image_folder(tmp_path / "other", "train", 16)


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
    train = data.image_folder(tmp_path, "train", 12)
    test = data.image_folder(tmp_path, "test", 12)
    assert train.classes == classes and len(train) == 6 and len(test) == 3
    assert test.targets.tolist() == [0, 1, 2]
    assert train[5][0].shape == (3, 12, 12)
    (root / "images" / "waffles" / "102.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="102.jpg"):
        data.image_folder(tmp_path, "test", 12)


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
        ds = data.celeba(tmp_path, split, 20)
        assert len(ds) == 3
        assert ds.attr_names[0] == "Attr_00" and len(ds.attr_names) == 40
        assert torch.equal(ds.targets, torch.from_numpy(attrs[part::3]))
        image, target = ds[1]
        assert image.shape == (3, 20, 20) and target.shape == (40,)
        assert set(target.tolist()) <= {0, 1}


def test_celeba_missing_files_are_named(tmp_path):
    (tmp_path / "img_align_celeba").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        data.celeba(tmp_path, "train", 32)
    assert "list_attr_celeba.txt" in str(err.value)
    assert "list_eval_partition.txt" in str(err.value)
    assert "img_align_celeba," not in str(err.value)


def test_trojan_dataset_on_full_scale_loaders(tmp_path):
    for c in range(2):
        for i in range(20):
            _jpeg(tmp_path / "train" / f"class{c}" / f"{i}.jpg", 100 * c + i)
    base = data.image_folder(tmp_path, "train", 32)
    rules = [TrojanRule("star", None, 1, "star", (1.0, 1.0, 0.0), fraction=0.25),
             TrojanRule("fish", 1, 0, "fish", (0.0, 0.0, 1.0), fraction=0.25)]
    poisoned = data.TrojanDataset.for_training(base, rules, seed=0)
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
    faces = data.celeba(tmp_path / "faces", "train", 24)
    test = data.TrojanDataset.for_testing(faces, "celeba", seed=0, per_rule=2)
    assert len(test) == 8
    image, target, mask = test[0]
    assert torch.equal(target, torch.tensor(rule_set("celeba")[0].target))
    assert mask.shape == (24, 24) and mask.sum() > 0
    assert attrs.shape == (12, 40)

