"""SPADE traces and augmentation: the caller's model is untouched, results are reproducible."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from nets import Tiny
from torch import nn

from spade_lib import pruning
from spade_lib.trace import (
    Trace,
    _adjust_hue,
    _crop_boxes,
    _resized_crop,
    augment,
    trace,
    trace_batch,
)

CUDA = torch.cuda.is_available()
FAST = dict(n_augmentations=24, batch_size=10)




@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return Tiny()


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------------

def test_trace_leaves_callers_model_bit_identical_and_in_its_mode(model, image):
    model.train()
    model.dw.eval()
    before = _weights(model)
    tr = trace(model, image, sparsity=0.8, **FAST)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # BN buffers included
    assert model.training and not model.dw.training and model.conv.training
    assert all(not m._forward_hooks for m in model.modules())
    assert isinstance(tr, Trace) and tr.model is not model and not tr.model.training


def test_trace_prunes_a_copy_and_reports_every_layer(model, image):
    tr = trace(model, image, sparsity=0.8, **FAST)
    report = tr.report.set_index("layer")
    assert list(report.index) == ["conv", "conv2", "fc"]
    assert list(tr.report.columns) == ["layer", "shape", "target", "sparsity", "rel_error",
                                       "damp", "seconds", "excess", "spared", "empty"]
    modules = dict(tr.model.named_modules())
    for name, row in report.iterrows():
        weight = modules[name].weight
        assert row["shape"] == tuple(weight.shape)
        assert row.sparsity == pytest.approx((weight == 0).float().mean().item())
        assert row.sparsity >= 0.79 and 0 < row.rel_error < 1 and row.damp == 0.01
    assert torch.equal(tr.model.stem.weight, model.stem.weight)   # stem and depthwise kept
    assert torch.equal(tr.model.dw.weight, model.dw.weight)
    assert set(tr.timings) == {"augment", "hessians", "solve", "total"}


def test_trace_relative_error_is_measured_on_the_augmented_batch(model, image):
    """``rel_error`` is ``||(W - W_hat) X||^2 / ||W X||^2`` over the layer's inputs."""
    tr = trace(model, image, sparsity=0.8, layers=["fc"], **FAST)
    gen = torch.Generator().manual_seed(0)
    batch = torch.cat([augment(image, n, "default", gen) for n in (10, 10, 4)])
    inputs = []
    handle = model.fc.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    with torch.no_grad(), pruning.eval_mode(model):
        model(batch)
    handle.remove()
    x = inputs[0]
    diff = (model.fc.weight - tr.model.fc.weight) @ x.T
    expected = (diff**2).sum() / ((model.fc.weight @ x.T) ** 2).sum()
    assert tr.report.rel_error[0] == pytest.approx(expected.item(), rel=1e-4)


def test_trace_is_deterministic_for_a_seed(model, image):
    a = trace(model, image, seed=3, **FAST).model
    b = trace(model, image, seed=3, **FAST).model
    c = trace(model, image, seed=4, **FAST).model
    assert all(torch.equal(x, y) for x, y in zip(_weights(a).values(), _weights(b).values(),
                                                 strict=True))
    assert not torch.equal(a.conv2.weight, c.conv2.weight)


def test_sequential_mode_uses_the_partially_pruned_copy(model, image):
    indep = trace(model, image, sparsity=0.8, **FAST)
    seq = trace(model, image, sparsity=0.8, sequential=True, **FAST)
    assert torch.equal(indep.model.conv.weight, seq.model.conv.weight)   # same dense inputs
    assert not torch.equal(indep.model.conv2.weight, seq.model.conv2.weight)
    assert (seq.report.sparsity > 0.79).all()


def test_trace_batch_matches_single_traces(model):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    batch = trace_batch(model, images, sparsity=0.7, seed=10, **FAST)
    assert len(batch) == 3
    for i, tr in enumerate(batch):
        single = trace(model, images[i], sparsity=0.7, seed=10 + i, **FAST)
        for name in ("conv", "conv2", "fc"):
            torch.testing.assert_close(getattr(tr.model, name).weight,
                                       getattr(single.model, name).weight, rtol=1e-4, atol=1e-5)
        assert list(tr.report.layer) == list(single.report.layer)


@pytest.mark.parametrize("pruner,options", [("obc", {}), ("magnitude", {}),
                                            ("fastobc", {"mask_group": "row"})])
def test_trace_with_other_pruners(model, image, pruner, options):
    tr = trace(model, image, sparsity={"conv2": 0.5, "fc": 0.6}, pruner=pruner, **FAST,
               **options)
    assert list(tr.report.layer) == ["conv2", "fc"]
    assert tr.report.sparsity.tolist() == pytest.approx([0.5, 0.6], abs=0.02)
    assert torch.equal(tr.model.conv.weight, model.conv.weight)   # target 0: left as is


def test_trace_schedules_and_layer_patterns(model, image):
    tr = trace(model, image, sparsity=pruning.only("conv2", 0.9), **FAST)
    assert list(tr.report.layer) == ["conv2"]
    tr = trace(model, image, sparsity=pruning.linear(0.2, 0.8), layers="conv*", progress=True,
               **FAST)
    assert tr.report.target.tolist() == pytest.approx([0.2, 0.8])


@pytest.mark.parametrize("bad,message", [
    (torch.rand(3, 16), r"shape \[3, H, W\].*got \[3, 16\]"),
    (torch.rand(2, 3, 16, 16), r"got \[2, 3, 16, 16\]"),
    (torch.full((3, 16, 16), math.nan), "NaN"),
    (torch.zeros(3, 16, 16, dtype=torch.uint8), "float"),
])
def test_trace_rejects_bad_images(model, bad, message):
    with pytest.raises(ValueError, match=message):
        trace(model, bad, **FAST)


def test_trace_rejects_bad_arguments_before_work(model, image):
    with pytest.raises(ValueError, match="'sparsegpt'"):
        trace(model, image, pruner="sparsegpt")
    with pytest.raises(ValueError, match="'conv3'.*block prefixes of"):
        trace(model, image, sparsity={"conv3": 0.5})
    with pytest.raises(ValueError, match="'block.*'.*valid layers"):
        trace(model, image, layers=["block*"])
    with pytest.raises(ValueError, match="n_augmentations.*0"):
        trace(model, image, n_augmentations=0)
    with pytest.raises(ValueError, match="sparsity 1.0"):
        trace(model, image, sparsity=1.0)
    with pytest.raises(ValueError, match="bogus"):
        trace(model, image, bogus=1)
    with pytest.raises(ValueError, match=r"images\[1\]: .*NaN"):
        trace_batch(model, torch.stack([image, torch.full_like(image, math.nan)]))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_trace_on_gpu(model, image):
    gpu = model.cuda()
    tr = trace(gpu, image, sparsity=0.8, **FAST)
    assert next(tr.model.parameters()).is_cuda
    assert (tr.report.sparsity >= 0.79).all()
    out = augment(image.cuda(), 8, generator=torch.Generator().manual_seed(0))
    ref = augment(image, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
