"""Feature visualization: the neuron rises far above its level on random images, one seed gives
one image, the model is left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spade_lib.visualize import fft_image, to_rgb, transform, visualize_neuron

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_class_neuron_rises_far_above_random_images(model) -> None:
    target = 3
    with torch.no_grad():
        noise = model(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    level, spread = noise[:, target].mean(), noise[:, target].std()
    vis = visualize_neuron(model, target, image_size=32, steps=256, seed=0)
    assert vis.image.shape == (1, 3, 32, 32)
    assert 0.0 <= float(vis.image.min()) and float(vis.image.max()) <= 1.0
    assert vis.final > level + 10 * spread, (vis.final, float(level), float(spread))
    assert vis.objective[-8:].mean() > vis.objective[:8].mean()
    with torch.no_grad():
        assert vis.final == pytest.approx(float(model(vis.image)[0, target]), rel=1e-5)


def test_a_channel_of_a_layer_and_the_model_left_alone(model) -> None:
    before, mode = _state(model), model.training
    model.train()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    vis = visualize_neuron(model, 5, image_size=32, layer="layers.1", steps=256, seed=2)
    captured = {}
    handle = dict(model.named_modules())["layers.1"].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("out", out))
    try:
        model.eval()
        with torch.no_grad():
            model(vis.image)
            on_image = float(captured["out"][0, 5].mean())
            model(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
            on_random = captured["out"][:, 5].mean((1, 2))
    finally:
        handle.remove()
    assert vis.final == pytest.approx(on_image, rel=1e-5)
    assert vis.final > float(on_random.max())
    model.train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert _hooks(model) == 0
    model.train(mode)


def test_one_seed_one_image(model) -> None:
    a = visualize_neuron(model, 1, image_size=32, steps=16, seed=7)
    b = visualize_neuron(model, 1, image_size=32, steps=16, seed=7)
    c = visualize_neuron(model, 1, image_size=32, steps=16, seed=8)
    assert torch.equal(a.image, b.image) and torch.equal(a.objective, b.objective)
    assert not torch.equal(a.image, c.image)


def test_parameterization_and_transforms_keep_shapes_and_range() -> None:
    gen = torch.Generator().manual_seed(0)
    spectrum, raw = fft_image(32, gen)
    assert spectrum.shape == (1, 3, 32, 17, 2) and spectrum.requires_grad
    image = to_rgb(raw())
    image = image.detach()
    assert image.shape == (1, 3, 32, 32) and 0 < float(image.min()) <= float(image.max()) < 1
    out = transform(image, gen)
    assert out.shape[:2] == (1, 3) and 28 <= out.shape[-1] <= 40


def test_bad_arguments_name_the_value(model) -> None:
    before = _state(model)
    with pytest.raises(ValueError, match="neuron 10 is outside the output, which has 10"):
        visualize_neuron(model, 10, image_size=32, steps=2)
    with pytest.raises(ValueError, match="layer 'nope' is not a module"):
        visualize_neuron(model, 0, image_size=32, steps=2, layer="nope")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        visualize_neuron(model, 0, image_size=32, steps=0)
    with pytest.raises(ValueError, match="lr must be a positive number, got -1"):
        visualize_neuron(model, 0, image_size=32, lr=-1)
    assert _hooks(model) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_batch_of_neurons_gives_each_single_visualization(model) -> None:
    """One batch of neurons = each neuron alone (Captum's batched-equals-unbatched check): the
    first image draws its start like a single run; all share the transforms of each step."""
    both = visualize_neuron(model, [1, 4], image_size=32, steps=12, seed=3)
    one = visualize_neuron(model, 1, image_size=32, steps=12, seed=3)
    assert both.image.shape == (2, 3, 32, 32) and both.objective.shape == (12, 2)
    assert len(both.final) == 2
    # float32 kernels may sum a batch in another order: a few ulps of relative error in each
    # gradient. Adam's step lr * m / sqrt(v) does not depend on the gradient's scale, so such an
    # error moves a step by about lr times itself, and 12 steps stay far below 1e-3 in [0, 1]
    # pixels (measured: 1.8e-7, the same with default, AVX2 kernels and one thread)
    assert torch.allclose(both.image[:1], one.image, atol=1e-3)
    assert both.final[0] == pytest.approx(one.final, rel=1e-3, abs=1e-3)
    other = visualize_neuron(model, 4, image_size=32, steps=12, seed=3)
    assert not torch.allclose(both.image[1:], other.image, atol=1e-3), \
        "the second image must start from its own draw, not the first image's"
    with pytest.raises(ValueError, match="non-empty sequence"):
        visualize_neuron(model, [], image_size=32, steps=2)
