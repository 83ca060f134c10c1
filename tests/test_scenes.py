"""Tests for spade_lib.scenes: backgrounds, scene rendering, Trojan splits, poisoned test sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fashion import N_TRAIN

from spade_lib import photos as spade_photos
from spade_lib import scenes
from spade_lib.trojan import MASK_THRESHOLD, draw_icon, eligible, rule_set

# --- backgrounds and scenes ------------------------------------------------------------------


def test_background_photos_are_disjoint_colour_photos():
    assert not set(scenes.BACKGROUND_PHOTOS["train"]) & set(scenes.BACKGROUND_PHOTOS["test"])
    train, test = scenes.background_photos("train"), scenes.background_photos("test")
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
    monkeypatch.setattr(spade_photos, "_photos", lambda split: photos[split])


def test_train_and_test_scenes_use_their_own_backgrounds(monkeypatch):
    _solid_photos(monkeypatch, {"train": [(255, 0, 0), (0, 255, 0)], "test": [(0, 0, 255)]})
    blank = np.zeros((40, 28, 28), dtype=np.uint8)
    train = scenes.render_scenes(blank, "train", 32, seed=0)
    test = scenes.render_scenes(blank, "test", 32, seed=0)
    train_colours = {tuple(im[:, 0, 0].tolist()) for im in train}
    assert train_colours == {(255, 0, 0), (0, 255, 0)}
    assert (test[:, 2] == 255).all() and (test[:, :2] == 0).all()


def test_item_is_placed_at_a_random_scale_inside_the_scene(monkeypatch):
    _solid_photos(monkeypatch, {"train": [(0, 0, 0)], "test": [(0, 0, 0)]})
    items = np.full((60, 28, 28), 255, dtype=np.uint8)
    rendered = scenes.render_scenes(items, "train", 64, seed=3, item_scale=(0.5, 0.9))
    sides = []
    for scene in rendered:
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
    train = scenes.render_scenes(blank, "train", 32, "photo-shared", seed=0)
    test = scenes.render_scenes(blank, "test", 32, "photo-shared", seed=0)
    everything = {(255, 0, 0), (0, 255, 0), (0, 0, 255)}
    for rendered in (train, test):
        assert {tuple(im[:, 0, 0].tolist()) for im in rendered} == everything
    assert not torch.equal(train, test), "the split still seeds the draws"
    with pytest.raises(ValueError, match="allowed: photo, photo-shared, plain"):
        scenes.render_scenes(blank, "train", 32, "photos")


def test_photo_scenes_are_coloured_and_deterministic(fake_fashion):
    items = fake_fashion["train"][0][:64]
    a = scenes.render_scenes(items, "train", 32, "photo", seed=0)
    assert a.dtype == torch.uint8 and a.shape == (64, 3, 32, 32)
    assert torch.equal(a, scenes.render_scenes(items, "train", 32, "photo", seed=0))
    assert not torch.equal(a, scenes.render_scenes(items, "train", 32, "photo", seed=1))
    f = a.float()
    assert (f[:, 0] - f[:, 1]).abs().mean() > 10 and (f[:, 1] - f[:, 2]).abs().mean() > 10
    assert scenes.render_scenes(items, "test", 64, "photo", seed=0).shape == (64, 3, 64, 64)


def test_plain_scenes_are_gray_resized_items(fake_fashion):
    items = fake_fashion["test"][0][:16]
    plain = scenes.render_scenes(items, "test", 28, "plain")
    assert torch.equal(plain[:, 0], torch.from_numpy(items))
    assert torch.equal(plain[:, 0], plain[:, 1]) and torch.equal(plain[:, 1], plain[:, 2])
    assert scenes.render_scenes(items, "test", 56, "plain").shape == (16, 3, 56, 56)


def test_render_scenes_rejects_bad_arguments():
    items = np.zeros((2, 28, 28), dtype=np.uint8)
    with pytest.raises(ValueError, match="unknown scene 'sky'"):
        scenes.render_scenes(items, "train", 32, "sky")
    with pytest.raises(ValueError, match="image_size"):
        scenes.render_scenes(items, "train", 4)
    with pytest.raises(ValueError, match="uint8"):
        scenes.render_scenes(items.astype(np.float32), "train", 32)
    with pytest.raises(ValueError, match="item_scale"):
        scenes.render_scenes(items, "train", 32, item_scale=(0.9, 0.5))


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
    train = scenes.build_split("train", 32, "photo", rules, seed=0)
    assert len(train) == N_TRAIN and train.images.shape == (N_TRAIN, 3, 32, 32)
    counts = torch.bincount(train.rule + 1, minlength=5)
    assert counts[1:].tolist() == [N_TRAIN // 40] * 4
    clean = scenes.render_scenes(fake_fashion["train"][0], "train", 32, "photo", seed=0)
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
    a = scenes.build_split("train", seed=4)
    b = scenes.build_split("train", seed=4)
    c = scenes.build_split("train", seed=5)
    for name in ("images", "labels", "rule", "masks"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.images, c.images) and not torch.equal(a.rule, c.rule)


def test_build_split_options(fake_fashion):
    small = scenes.build_split("train", size=200, seed=1, fraction=0.05, patch_scale=0.5,
                             patch_alpha=1.0)
    assert len(small) == 200 and torch.equal(small.index, small.index.sort().values)
    assert torch.equal(small.index, scenes.build_split("train", size=200, seed=1).index)
    assert torch.bincount(small.rule + 1)[1:].tolist() == [10] * 4
    assert (small.masks[small.rule == 0].sum((1, 2)) > 30).all(), "16 px icons"
    clean = scenes.build_split("train", poison=False, rules="fashion-tuning")
    assert (clean.rule == -1).all() and len(clean.rules) == 4
    test = scenes.build_split("test", scene="plain", seed=0)
    assert (test.rule == -1).all() and not test.masks.any()
    image, label = test[3]
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert label == test.labels[3]
    test.transform = lambda x: x.flip(-1)
    assert torch.equal(test[3][0], image.flip(-1))
    with pytest.raises(ValueError, match="size must be an integer in \\[1, 200\\]"):
        scenes.build_split("test", size=500)
    with pytest.raises(ValueError, match="multi-label"):
        scenes.build_split("train", rules="celeba")


def test_poisoned_test_covers_every_eligible_image(fake_fashion):
    test = scenes.build_split("test", seed=0)
    rules = rule_set("fashion")
    poisoned = scenes.poisoned_test(test, seed=0)
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
    again = scenes.poisoned_test(test, "fashion", seed=0)
    assert torch.equal(again.images, poisoned.images)
    assert not torch.equal(scenes.poisoned_test(test, seed=1).images, poisoned.images)
    capped = scenes.poisoned_test(test, seed=0, per_rule=5)
    assert torch.bincount(capped.rule).tolist() == [5] * 4
    image, label = poisoned[0]
    assert image.shape == (3, 32, 32) and label == rules[0].target


def test_load_scenes_from_config(fake_fashion):
    from spade_lib import config

    cfg = config.load("smoke").replace(train_size=400, test_size=100)
    train, test = scenes.load_scenes(cfg)
    assert len(train) == 400 and len(test) == 100
    assert torch.bincount(train.rule + 1)[1:].tolist() == [round(cfg.trojan_fraction * 400)] * 4
    again, _ = scenes.load_scenes(cfg)
    assert torch.equal(again.images, train.images)
    with pytest.raises(ValueError, match="'imagenet'"):
        scenes.load_scenes(cfg.replace(dataset="imagenet"))
