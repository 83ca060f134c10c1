"""Augmented views: the recipes against torchvision, and the one generator of a trace's batches."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import spade_lib
from spade_lib.augment import (
    RECIPES,
    _adjust_hue,
    _crop_boxes,
    _resized_crop,
    augment,
    augmented_batches,
    check_recipe,
    recipe_components,
)

CUDA = torch.cuda.is_available()


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_augment_shape_range_and_determinism(image):
    a = augment(image, 32, generator=torch.Generator().manual_seed(3))
    b = augment(image[None], 32, generator=torch.Generator().manual_seed(3))
    c = augment(image, 32, generator=4)
    assert a.shape == (32, 3, 16, 16) and a.dtype == image.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert not any(torch.equal(x, image) for x in a)   # the original is not in the batch
    assert a.std(0).mean() > 0.05                      # the copies differ from one another


def test_crop_resize_equals_torchvision_resized_crop():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 20, 24, generator=g)
    boxes = _crop_boxes(16, 20, 24, g, torch.device("cpu"))
    flip = torch.rand(16, generator=g) < 0.5
    out = _resized_crop(img[None], boxes, flip)
    for k in range(16):
        top, left, h, w = (int(v) for v in boxes[k])
        ref = TF.resized_crop(img, top, left, h, w, [20, 24], antialias=False)
        ref = ref.flip(-1) if flip[k] else ref
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-5)


def test_crop_boxes_follow_random_resized_crop_ranges():
    boxes = _crop_boxes(4000, 32, 40, torch.Generator().manual_seed(0), torch.device("cpu"))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 40).all()
    area = h * w / (32 * 40)
    assert area.min() >= 0.18 and area.max() <= 1.0       # scale (0.2, 1) up to rounding
    assert 0.5 < area.mean() < 0.65
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.45       # ratio (3/4, 4/3) up to rounding


def test_hue_shift_equals_torchvision():
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    shifts = torch.tensor([-0.3, -0.1, 0.0, 0.2, 0.3])
    ref = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(5)])
    torch.testing.assert_close(_adjust_hue(x, shifts), ref, rtol=1e-5, atol=1e-5)


def test_convnext_recipe_adds_noise_and_erasing():
    image = torch.full((3, 32, 32), 0.5)
    out = augment(image, 64, "convnext", generator=0)
    erased = (out == 0).all(1).flatten(1).sum(1)           # black pixels per copy
    assert 10 < (erased > 0).sum() < 54                    # RandomErasing with p 0.5
    assert (erased[erased > 0] >= 0.02 * 32 * 32 * 0.9).all()
    plain = augment(image, 64, "default", generator=0)
    assert (plain == 0).all(1).sum() == 0


def test_augment_rejects_bad_arguments(image):
    with pytest.raises(ValueError, match="recipe 'strong'.*default, convnext"):
        augment(image, 4, "strong")
    with pytest.raises(ValueError, match="int >= 1, got 0"):
        augment(image, 0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_augmented_batches_are_consecutive_draws_of_one_seeded_generator(image, recipe):
    batches = list(augmented_batches(image, 10, recipe, seed=3, batch_size=4))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    gen = torch.Generator().manual_seed(3)
    for batch in batches:
        assert torch.equal(batch, augment(image, batch.shape[0], recipe, gen))
    again = torch.cat(list(augmented_batches(image, 10, recipe, seed=3, batch_size=4)))
    assert torch.equal(torch.cat(batches), again)
    other = torch.cat(list(augmented_batches(image, 10, recipe, seed=4, batch_size=4)))
    assert not torch.equal(torch.cat(batches), other)


def test_augment_is_importable_from_its_old_homes():
    from spade_lib.trace import augment as old
    assert old is augment and spade_lib.augment is augment


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_augment_on_gpu_equals_cpu(image):
    out = augment(image.cuda(), 8, generator=torch.Generator().manual_seed(0))
    ref = augment(image, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Table D.12's recipes: combinations of the components J, G, RC, RR
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("named", "spelled"), [("default", "J+RC"), ("default", "RC+J"),
                                                ("convnext", "RR+G+J+RC")])
def test_named_recipes_are_their_components_bit_for_bit(image, named, spelled):
    assert torch.equal(augment(image, 16, named, generator=5), augment(image, 16, spelled,
                                                                        generator=5))


def test_gaussian_noise_alone_has_the_table_c8_variance():
    image = torch.full((3, 32, 32), 0.5)                  # far from 0 and 1: no clipping
    out = augment(image, 64, "G", generator=0)
    noise = out - image
    # 196608 draws: the sample variance is within 1% of sigma^2 = 0.001 (its relative standard
    # error is sqrt(2 / n) = 0.3%), the mean within 5 standard errors of 0
    assert abs(noise.var().item() / 0.001 - 1) < 0.01
    assert abs(noise.mean().item()) < 5 * math.sqrt(0.001 / noise.numel())


def test_random_removal_alone_only_erases(image):
    out = augment(image, 64, "RR", generator=0)
    kept = out == image[None]
    assert ((out == 0) | kept).all()                       # a pixel is erased or untouched
    erased = (~kept).all(1).flatten(1).any(1)
    assert 10 < int(erased.sum()) < 54                     # p 0.5 of 64 copies, +-5.5 sigma


def test_jitter_alone_keeps_the_geometry():
    image = torch.full((3, 16, 16), 0.4)
    image[0] = 0.7                                         # a coloured, flat image
    out = augment(image, 32, "J", generator=0)
    assert (out.flatten(2).std(2) < 1e-6).all()            # each copy still flat
    assert out.flatten(1).std(0).mean() > 0.01             # but copies differ in colour


def test_crop_alone_equals_the_drawn_boxes(image):
    gen = torch.Generator().manual_seed(2)
    boxes = _crop_boxes(8, 16, 16, gen, torch.device("cpu"))
    flip = torch.rand(8, generator=gen) < 0.5
    assert torch.equal(augment(image, 8, "RC", generator=2),
                       _resized_crop(image[None], boxes, flip))


@pytest.mark.parametrize("bad", ["J+J", "X", "", "J+", "j+rc", 3])
def test_bad_recipes_name_the_components(image, bad):
    with pytest.raises(ValueError, match=r"recipe .*combination of RC, J, G, RR"):
        augment(image, 2, bad)
    with pytest.raises(ValueError, match=r"recipe .*combination of RC, J, G, RR"):
        check_recipe(bad)
    assert recipe_components("G+RR") == ("G", "RR")
