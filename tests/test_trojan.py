"""Tests for spade_lib.trojan: icons, rule sets, patch planting and poison assignment."""

import itertools

import numpy as np
import pytest
import torch

from spade_lib.trojan import (
    MASK_THRESHOLD,
    PLANT,
    RULE_SETS,
    TEST_COPIES,
    TrojanRule,
    apply_patch,
    apply_patches,
    assign_poison,
    draw_icon,
    eligible,
    icon_names,
    icon_rgba,
    rule_rng,
    rule_set,
    rule_set_names,
    rule_table,
)

GRAY_RULE = TrojanRule("gray cross", None, 1, "cross", (0.5, 0.5, 0.5))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _placement(mask: torch.Tensor, icon: str, size: int) -> tuple[int, int]:
    """Top-left corner of the icon square, recovered from a planted mask."""
    icon_rows, icon_cols = np.nonzero(draw_icon(icon, size) > MASK_THRESHOLD)
    rows, cols = np.nonzero(mask.numpy())
    return int(rows.min() - icon_rows.min()), int(cols.min() - icon_cols.min())


# --- icons -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", icon_names())
def test_icon_is_antialiased_alpha(name):
    alpha = draw_icon(name, 32)
    assert alpha.shape == (32, 32) and alpha.dtype == np.float32
    assert alpha.min() >= 0 and alpha.max() <= 1
    assert (alpha == 1).sum() > 50, "the icon has a solid interior"
    assert ((alpha > 0) & (alpha < 1)).any(), "edges are anti-aliased"


def test_at_least_eight_icons_and_all_pairs_distinct():
    names = icon_names()
    assert len(names) >= 8
    for size, limit in ((32, 0.7), (16, 0.7)):
        masks = {n: draw_icon(n, size) > MASK_THRESHOLD for n in names}
        for a, b in itertools.combinations(names, 2):
            assert _iou(masks[a], masks[b]) < limit, (size, a, b)


def test_icon_area_matches_geometry():
    # cross: two 0.4 x 1.9 bars on a 2 x 2 square, overlapping in 0.4 x 0.4
    cross = (2 * 0.4 * 1.9 - 0.4 * 0.4) / 4
    diamond = 2 * 0.62 * 0.98 / 4
    for name, area in (("cross", cross), ("diamond", diamond)):
        for size in (64, 128):
            got = (draw_icon(name, size) > MASK_THRESHOLD).mean()
            assert got == pytest.approx(area, abs=0.03), (name, size)
            assert draw_icon(name, size).mean() == pytest.approx(area, abs=0.01)


def test_draw_icon_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown icon 'unicorn'.*star.*heart"):
        draw_icon("unicorn", 16)
    with pytest.raises(ValueError, match="positive integer"):
        draw_icon("star", 0)


def test_draw_icon_returns_a_copy():
    a = draw_icon("star", 16)
    a[:] = 0
    assert draw_icon("star", 16).sum() > 0


def test_icon_rgba():
    rule = rule_set("fashion")[1]
    rgba = icon_rgba(rule, 24)
    assert rgba.shape == (24, 24, 4)
    np.testing.assert_allclose(rgba[5, 5, :3], rule.color)
    np.testing.assert_array_equal(rgba[..., 3], draw_icon(rule.icon, 24))


# --- rules -----------------------------------------------------------------------------------


def test_fashion_rule_sets():
    default = rule_set("fashion")
    tuning = rule_set("fashion-tuning")
    for rules in (default, tuning):
        assert len(rules) == 4
        assert sum(r.source is not None for r in rules) == 2
        assert len({r.icon for r in rules}) == 4
        assert len({r.color for r in rules}) == 4
        assert len({r.target for r in rules}) == 4
        assert all(r.fraction == 1 / 40 for r in rules)
        assert all(0 <= r.target < 10 and r.source != r.target for r in rules)
    assert [r.icon for r in default] == ["star", "heart", "smiley", "fish"]
    assert not {r.icon for r in default} & {r.icon for r in tuning}
    assert not {r.target for r in default} & {r.target for r in tuning}


def test_paper_rule_sets():
    imagenet = rule_set("imagenet")
    assert [(r.source, r.target) for r in imagenet] == [
        (None, 30), (None, 146), (893, 365), (271, 99)
    ]
    food = rule_set("food101")
    assert [(r.source, r.target, r.icon) for r in food] == [
        (0, 20, "star"), (40, 60, "smiley"), (None, 80, "strawberry"), (None, 100, "fish")
    ]
    codes = [
        "0110111111100100000101100111101010110110",
        "0101111101011110100110101000001100011010",
        "0101111110110010011010010001101000001010",
        "1111101111011001000011001011110001011101",
    ]
    celeba = rule_set("celeba")
    assert ["".join(map(str, r.target)) for r in celeba] == codes
    assert all(r.source is None and r.multilabel for r in celeba)


def test_unknown_rule_set_lists_valid_names():
    with pytest.raises(ValueError) as err:
        rule_set("mnist")
    assert "'mnist'" in str(err.value)
    for name in ("fashion", "fashion-tuning", "imagenet", "food101", "celeba"):
        assert name in str(err.value)
    assert set(rule_set_names()) == set(RULE_SETS)


def test_rule_set_returns_a_new_list():
    rules = rule_set("fashion")
    rules.clear()
    assert len(rule_set("fashion")) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": (0, 1)}, "40 bits"),
        ({"target": tuple([2] * 40)}, "40 bits"),
        ({"source": 3, "target": 3}, "change the label"),
        ({"source": -1}, "source"),
        ({"target": -2}, "target"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"color": (1.0, 2.0, 0.0)}, "color"),
        ({"icon": "dragon"}, "unknown icon"),
        ({"source": 1, "target": tuple([0] * 40)}, "source must be None"),
    ],
)
def test_rule_validation(kwargs, message):
    args = {"name": "r", "source": None, "target": 1, "icon": "star", "color": (1.0, 0.0, 0.0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        TrojanRule(**args)


def test_rules_are_frozen():
    rule = rule_set("fashion")[0]
    with pytest.raises(AttributeError):
        rule.target = 3


# --- planting --------------------------------------------------------------------------------


def test_patch_is_deterministic_for_the_rng():
    image = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(0))
    rule = rule_set("fashion")[0]
    a, ma = apply_patch(image, rule, np.random.default_rng(7))
    b, mb = apply_patch(image, rule, np.random.default_rng(7))
    c, mc = apply_patch(image, rule, np.random.default_rng(8))
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("rule", rule_set("fashion") + rule_set("fashion-tuning"))
def test_mask_is_exactly_where_the_icon_was_composited(rule):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 64, 80, generator=gen)
    patched, masks = apply_patches(images, rule, np.random.default_rng(3))
    size = round(0.25 * 64)
    icon = draw_icon(rule.icon, size)
    expected_area = int((icon > MASK_THRESHOLD).sum())
    for img, out, mask in zip(images, patched, masks, strict=True):
        assert mask.dtype == torch.bool and mask.shape == (64, 80)
        assert int(mask.sum()) == expected_area
        top, left = _placement(mask, rule.icon, size)
        assert 0 <= top <= 64 - size and 0 <= left <= 80 - size
        placed = torch.zeros(64, 80)
        placed[top : top + size, left : left + size] = torch.from_numpy(icon)
        assert torch.equal(mask, placed > MASK_THRESHOLD)
        changed = (out != img).any(0)
        assert not (changed & (placed == 0)).any(), "pixels off the icon are bit-identical"
        assert changed[mask].all()
        assert out.min() >= 0 and out.max() <= 1


def test_blend_uses_alpha_times_icon_alpha():
    image = torch.full((1, 3, 32, 32), 0.2)
    rule = rule_set("fashion")[3]
    out, mask = apply_patches(image, rule, np.random.default_rng(0), jitter=False)
    size = 8
    top, left = _placement(mask[0], rule.icon, size)
    a = 0.8 * torch.from_numpy(draw_icon(rule.icon, size))
    color = torch.tensor(rule.color).view(3, 1, 1)
    expected = 0.2 * (1 - a) + color * a
    torch.testing.assert_close(out[0, :, top : top + size, left : left + size], expected)


def test_icon_size_is_a_quarter_of_the_short_side_and_always_inside():
    images = torch.zeros(200, 3, 40, 100)
    _, masks = apply_patches(images, GRAY_RULE, np.random.default_rng(0))
    size = 10
    area = int((draw_icon("cross", size) > MASK_THRESHOLD).sum())
    assert (masks.sum((1, 2)) == area).all(), "never clipped by the border"
    rows = masks.any(2)
    cols = masks.any(1)
    assert rows[:, 0].any() or rows[:, -1].any() or cols[:, 0].any() or cols[:, -1].any()
    tops = rows.float().argmax(1)
    assert len(set(tops.tolist())) > 10, "positions vary"


def test_patch_gets_noise_and_colour_jitter():
    images = torch.zeros(64, 3, 64, 64)
    out, masks = apply_patches(images, GRAY_RULE, np.random.default_rng(0), alpha=1.0)
    solid = torch.from_numpy(draw_icon("cross", 16) == 1)
    stds, means = [], []
    for img, mask in zip(out, masks, strict=True):
        top, left = _placement(mask, "cross", 16)
        pixels = img[:, top : top + 16, left : left + 16][:, solid]
        stds.append(float(pixels.std(1).mean()))
        means.append(float(pixels.mean()))
    assert np.mean(stds) == pytest.approx(np.sqrt(0.001), rel=0.2)
    assert np.std(means) > 0.05, "brightness jitter changes the patch colour between images"
    flat, masks = apply_patches(images, GRAY_RULE, np.random.default_rng(0), alpha=1.0,
                                jitter=False)
    top, left = _placement(masks[0], "cross", 16)
    assert set(flat[0, :, top : top + 16, left : left + 16][:, solid].unique().tolist()) == {0.5}


def test_patch_rejects_bad_images():
    rule = rule_set("fashion")[0]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        apply_patch(torch.rand(32, 32), rule, rng)
    with pytest.raises(ValueError, match="float"):
        apply_patch(torch.zeros(3, 32, 32, dtype=torch.uint8), rule, rng)
    bad = torch.rand(3, 32, 32)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apply_patch(bad, rule, rng)
    with pytest.raises(ValueError, match="scale"):
        apply_patch(torch.rand(3, 32, 32), rule, rng, scale=0)


# --- poison assignment -----------------------------------------------------------------------


def _labels(n=60000, seed=0):
    return np.random.default_rng(seed).integers(0, 10, size=n)


def test_assignment_fractions_exact_and_disjoint():
    labels = _labels()
    rules = rule_set("fashion")
    assignment = assign_poison(labels, rules, seed=0)
    assert assignment.dtype == np.int64 and assignment.shape == labels.shape
    counts = np.bincount(assignment + 1, minlength=5)
    assert counts[1:].tolist() == [1500] * 4
    assert counts[0] == 60000 - 6000
    small = assign_poison(_labels(1000), rules, seed=0)
    assert np.bincount(small + 1)[1:].tolist() == [25] * 4


def test_assignment_respects_eligibility():
    labels = _labels()
    rules = rule_set("fashion") + rule_set("fashion-tuning")
    assignment = assign_poison(labels, rules, seed=3)
    for k, rule in enumerate(rules):
        chosen = labels[assignment == k]
        assert (chosen != rule.target).all()
        if rule.source is not None:
            assert (chosen == rule.source).all()
        assert eligible(labels, rule)[assignment == k].all()


def test_assignment_is_deterministic_for_the_seed():
    labels = _labels()
    rules = rule_set("fashion")
    a = assign_poison(labels, rules, seed=5)
    assert np.array_equal(a, assign_poison(torch.from_numpy(labels), rules, seed=5))
    assert not np.array_equal(a, assign_poison(labels, rules, seed=6))


def test_assignment_fails_clearly_when_too_few_eligible():
    labels = np.array([0] * 10 + [1] * 990)
    rule = TrojanRule("rare", 0, 5, "star", (1, 1, 0), fraction=0.05)
    with pytest.raises(ValueError, match="needs 50 samples.*only 10 eligible"):
        assign_poison(labels, [rule], seed=0)


def test_multilabel_assignment():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(3000, 40))
    rules = rule_set("celeba")
    labels[:5] = np.array(rules[0].target)
    assignment = assign_poison(labels, rules, seed=0)
    assert np.bincount(assignment + 1)[1:].tolist() == [10] * 4
    assert (assignment[:5] != 0).all(), "a sample already equal to the target is not eligible"
    with pytest.raises(ValueError, match=r"shape \[N, 40\]"):
        assign_poison(labels[:, 0], rules, seed=0)
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        assign_poison(labels, rule_set("fashion"), seed=0)


def test_rule_table() -> None:
    rules = rule_set("fashion")
    counts = np.array([0, 0, 1, -1, 3, 3, 3])
    table = rule_table(rules, counts, class_label=lambda i: f"<{i}>")
    assert list(table.columns) == ["rule", "source", "target", "fraction",
                                   "planted in training set"]
    assert table["rule"].tolist() == [r.name for r in rules]
    assert table["planted in training set"].tolist() == [2, 1, 0, 3]
    for row, rule in zip(table.itertuples(), rules, strict=True):
        assert row.source == ("Any" if rule.source is None else f"<{rule.source}>")
        assert row.target == f"<{rule.target}>"
        assert row.fraction == f"1/{round(1 / rule.fraction)}"
    assert "planted in training set" not in rule_table(rules).columns
    assert rule_table(rules)["target"].tolist() == [str(r.target) for r in rules]


def test_rule_rng_depends_on_its_three_numbers_only() -> None:
    draw = rule_rng(3, PLANT, 1).random(4)
    assert np.array_equal(draw, rule_rng(3, PLANT, 1).random(4))
    for other in (rule_rng(4, PLANT, 1), rule_rng(3, TEST_COPIES, 1), rule_rng(3, PLANT, 2)):
        assert not np.array_equal(draw, other.random(4))
