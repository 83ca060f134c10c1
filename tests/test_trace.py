"""SPADE traces: the caller's model is untouched, results are reproducible."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from spade_lib import pruning
from spade_lib.augment import augment, augmented_batches
from spade_lib.hessians import eval_mode, layer_hessians
from spade_lib.schedules import linear, only
from spade_lib.trace import Trace, trace, trace_batch, trace_images

CUDA = torch.cuda.is_available()
FAST = dict(n_augmentations=24, batch_size=10)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))


def _weights(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------------

def test_trace_leaves_callers_model_bit_identical_and_in_its_mode(tiny, image):
    tiny.train()
    tiny.dw.eval()
    before = _weights(tiny)
    tr = trace(tiny, image, sparsity=0.8, **FAST)
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # BN buffers included
    assert tiny.training and not tiny.dw.training and tiny.conv.training
    assert all(not m._forward_hooks for m in tiny.modules())
    assert isinstance(tr, Trace) and tr.model is not tiny and not tr.model.training


def test_trace_prunes_a_copy_and_reports_every_layer(tiny, image):
    tr = trace(tiny, image, sparsity=0.8, **FAST)
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
    assert torch.equal(tr.model.stem.weight, tiny.stem.weight)   # stem and depthwise kept
    assert torch.equal(tr.model.dw.weight, tiny.dw.weight)
    assert set(tr.timings) == {"augment", "hessians", "solve", "total"}


def test_trace_relative_error_is_measured_on_the_augmented_batch(tiny, image):
    """``rel_error`` is ``||(W - W_hat) X||^2 / ||W X||^2`` over the layer's inputs."""
    tr = trace(tiny, image, sparsity=0.8, layers=["fc"], **FAST)
    gen = torch.Generator().manual_seed(0)
    batch = torch.cat([augment(image, n, "default", gen) for n in (10, 10, 4)])
    inputs = []
    handle = tiny.fc.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    with torch.no_grad(), eval_mode(tiny):
        tiny(batch)
    handle.remove()
    x = inputs[0]
    diff = (tiny.fc.weight - tr.model.fc.weight) @ x.T
    expected = (diff**2).sum() / ((tiny.fc.weight @ x.T) ** 2).sum()
    assert tr.report.rel_error[0] == pytest.approx(expected.item(), rel=1e-4)


def test_trace_is_deterministic_for_a_seed(tiny, image):
    a = trace(tiny, image, seed=3, **FAST).model
    b = trace(tiny, image, seed=3, **FAST).model
    c = trace(tiny, image, seed=4, **FAST).model
    assert all(torch.equal(x, y) for x, y in zip(_weights(a).values(), _weights(b).values(),
                                                 strict=True))
    assert not torch.equal(a.conv2.weight, c.conv2.weight)


def test_sequential_mode_uses_the_partially_pruned_copy(tiny, image):
    indep = trace(tiny, image, sparsity=0.8, **FAST)
    seq = trace(tiny, image, sparsity=0.8, sequential=True, **FAST)
    assert torch.equal(indep.model.conv.weight, seq.model.conv.weight)   # same dense inputs
    assert not torch.equal(indep.model.conv2.weight, seq.model.conv2.weight)
    assert (seq.report.sparsity > 0.79).all()


def test_trace_batch_matches_single_traces(tiny):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    batch = trace_batch(tiny, images, sparsity=0.7, seed=10, **FAST)
    assert len(batch) == 3
    for i, tr in enumerate(batch):
        single = trace(tiny, images[i], sparsity=0.7, seed=10 + i, **FAST)
        for name in ("conv", "conv2", "fc"):
            torch.testing.assert_close(getattr(tr.model, name).weight,
                                       getattr(single.model, name).weight, rtol=1e-4, atol=1e-5)
        assert list(tr.report.layer) == list(single.report.layer)


@pytest.mark.parametrize("sequential", [False, True])
def test_trace_equals_the_algorithm_spelled_out(tiny, image, sequential):
    """Views from the seed, Hessians (of the dense copy, or of the copy pruned so far), one
    solve per layer: the same weights bit for bit."""
    tr = trace(tiny, image, sparsity=0.8, seed=2, sequential=sequential, **FAST)
    work = copy.deepcopy(tiny).eval()
    names = ["conv", "conv2", "fc"]

    def hessians(layers):
        views = augmented_batches(image, FAST["n_augmentations"], "default", 2,
                                  FAST["batch_size"])
        return layer_hessians(work, views, layers)

    dense = None if sequential else hessians(names)
    for name in names:
        h = hessians([name])[name] if sequential else dense[name]
        layer = dict(work.named_modules())[name]
        new, _ = pruning.prune_layer(layer.weight, h, 0.8)
        with torch.no_grad():
            layer.weight.copy_(new)
    for (key, x), y in zip(_weights(tr.model).items(), _weights(work).values(), strict=True):
        assert torch.equal(x, y), key


def test_trace_is_trace_batch_of_one_sample(tiny, image):
    single = trace(tiny, image, sparsity=0.7, seed=4, **FAST)
    (batch,) = trace_batch(tiny, image[None], sparsity=0.7, seed=4, **FAST)
    for (key, x), y in zip(_weights(single.model).items(), _weights(batch.model).values(),
                           strict=True):
        assert torch.equal(x, y), key
    assert single.report.drop(columns="seconds").equals(batch.report.drop(columns="seconds"))


def test_trace_images_is_a_trace_on_those_views(tiny, image):
    """Hessians from given images: handing it a trace's own augmented views gives that trace,
    bit for bit, and the caller's model and images stay as they were."""
    views = torch.cat(list(augmented_batches(image, FAST["n_augmentations"], "default", 3,
                                             FAST["batch_size"])))
    before, kept = _weights(tiny), views.clone()
    got = trace_images(tiny, views, sparsity=0.75, batch_size=FAST["batch_size"])
    want = trace(tiny, image, sparsity=0.75, seed=3, **FAST)
    for (key, x), y in zip(_weights(got.model).items(), _weights(want.model).values(),
                           strict=True):
        assert torch.equal(x, y), key
    assert list(got.report.layer) == list(want.report.layer)
    assert torch.equal(views, kept)
    assert all(torch.equal(v, before[k]) for k, v in _weights(tiny).items())
    other = trace_images(tiny, torch.rand(24, 3, 16, 16, generator=torch.Generator()
                                          .manual_seed(0)), sparsity=0.75)
    assert not torch.equal(other.model.fc.weight, got.model.fc.weight)


@pytest.mark.parametrize(("bad", "message"), [
    (torch.rand(3, 16, 16), r"images must have shape \[N, 3, H, W\]"),
    (torch.rand(2, 3, 16, 16) * 2, r"\[0, 1\]"),
    (torch.zeros(0, 3, 16, 16), "empty"),
])
def test_trace_images_rejects_bad_images(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        trace_images(tiny, bad)


@pytest.mark.parametrize("pruner,options", [("obc", {}), ("magnitude", {}),
                                            ("fastobc", {"mask_group": "row"})])
def test_trace_with_other_pruners(tiny, image, pruner, options):
    tr = trace(tiny, image, sparsity={"conv2": 0.5, "fc": 0.6}, pruner=pruner, **FAST,
               **options)
    assert list(tr.report.layer) == ["conv2", "fc"]
    assert tr.report.sparsity.tolist() == pytest.approx([0.5, 0.6], abs=0.02)
    assert torch.equal(tr.model.conv.weight, tiny.conv.weight)   # target 0: left as is


def test_trace_schedules_and_layer_patterns(tiny, image):
    tr = trace(tiny, image, sparsity=only("conv2", 0.9), **FAST)
    assert list(tr.report.layer) == ["conv2"]
    tr = trace(tiny, image, sparsity=linear(0.2, 0.8), layers="conv*", progress=True,
               **FAST)
    assert tr.report.target.tolist() == pytest.approx([0.2, 0.8])


@pytest.mark.parametrize("bad,message", [
    (torch.rand(3, 16), r"shape \[3, H, W\].*got \[3, 16\]"),
    (torch.rand(2, 3, 16, 16), r"got \[2, 3, 16, 16\]"),
    (torch.full((3, 16, 16), math.nan), "NaN"),
    (torch.zeros(3, 16, 16, dtype=torch.uint8), "float"),
])
def test_trace_rejects_bad_images(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        trace(tiny, bad, **FAST)


def test_trace_rejects_bad_arguments_before_work(tiny, image):
    with pytest.raises(ValueError, match="'sparsegpt'"):
        trace(tiny, image, pruner="sparsegpt")
    with pytest.raises(ValueError, match="'conv3'.*block prefixes of"):
        trace(tiny, image, sparsity={"conv3": 0.5})
    with pytest.raises(ValueError, match="'block.*'.*valid layers"):
        trace(tiny, image, layers=["block*"])
    with pytest.raises(ValueError, match="n_augmentations.*0"):
        trace(tiny, image, n_augmentations=0)
    with pytest.raises(ValueError, match="sparsity 1.0"):
        trace(tiny, image, sparsity=1.0)
    with pytest.raises(ValueError, match="bogus"):
        trace(tiny, image, bogus=1)
    with pytest.raises(ValueError, match="passed as recipe=, not augment="):
        trace(tiny, image, augment="convnext")
    with pytest.raises(ValueError, match=r"images\[1\]: .*NaN"):
        trace_batch(tiny, torch.stack([image, torch.full_like(image, math.nan)]))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_trace_on_gpu(tiny, image):
    gpu = tiny.cuda()
    tr = trace(gpu, image, sparsity=0.8, **FAST)
    assert next(tr.model.parameters()).is_cuda
    assert (tr.report.sparsity >= 0.79).all()
