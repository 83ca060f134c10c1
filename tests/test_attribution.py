"""Attribution: registry, input checks, every method on the small networks, batch invariance,
seeding, agreement with hand-computed gradients and LRP rules, relevance conservation, and the
caller's network left untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from nets import model_state, randomize_bn, same_state, smooth_images
from torch import nn

from spade_lib.attribution import (
    DESCRIPTIONS,
    GROUPS,
    METHODS,
    Attribution,
    attribute,
    default_cam_layer,
    get_method,
    gradient_shap_baselines,
    methods_table,
    occlusion_window,
    superpixels,
    supported_methods,
)
from spade_lib.models import build_model

SIDE = 16
FAST = {"Lime": {"n_samples": 40, "n_segments": 12}, "IntegratedGradients": {"n_steps": 8},
        "GradientShap": {"n_samples": 6}, "Occlusion": {"perturbations_per_eval": 128}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    """A random ResNet-20 whose logits spread like a trained one's (std about 4)."""
    torch.manual_seed(0)  # inline: ``seeded`` is per test and this network is built per module
    model = randomize_bn(build_model("resnet20", width=8, image_size=SIDE), seed=1)
    model.fc.weight.data.mul_(30.0)
    return model


# --------------------------------------------------------------------------------------------
# Registry and checks
# --------------------------------------------------------------------------------------------

def test_registry_matches_table_a1() -> None:
    assert METHODS == ("Saliency", "InputXGradient", "DeepLift", "LRP", "GuidedBackprop",
                       "GuidedGradCam", "Lime", "Occlusion", "IntegratedGradients",
                       "GradientShap")
    assert [m for m in METHODS if GROUPS[m] == "gradient"] == list(METHODS[:5])
    assert [m for m in METHODS if GROUPS[m] == "perturbation"] == ["GuidedGradCam", "Lime"]
    assert [m for m in METHODS if GROUPS[m] == "mixed"] == list(METHODS[7:])
    assert all(len(DESCRIPTIONS[m]) > 30 for m in METHODS)
    table = methods_table()
    assert table["method"].tolist() == list(METHODS)
    assert table.loc[table["method"] == "LRP", "library"].item() == "zennit"
    assert set(table.loc[table["seeded"], "method"]) == {"Lime", "GradientShap"}
    assert get_method("Lime").defaults["seed"] == 0


def test_unknown_method_and_option(resnet: nn.Module) -> None:
    x = smooth_images()
    with pytest.raises(ValueError, match="unknown attribution method 'Gradcam'") as info:
        attribute(resnet, x, 0, "Gradcam")
    assert all(name in str(info.value) for name in METHODS)
    with pytest.raises(ValueError, match="Saliency has no option 'n_steps'; allowed: abs"):
        attribute(resnet, x, 0, "Saliency", n_steps=4)
    with pytest.raises(ValueError, match="option n_steps must be an integer >= 1"):
        attribute(resnet, x, 0, "IntegratedGradients", n_steps=0)


@pytest.mark.parametrize(("images", "target", "match"), [
    (torch.rand(3, SIDE, SIDE), 0, r"\[N, C, H, W\]"),
    (torch.full((1, 3, SIDE, SIDE), float("nan")), 0, "NaN"),
    (torch.randint(0, 2, (1, 3, SIDE, SIDE)), 0, "float"),
    (torch.rand(2, 3, SIDE, SIDE), 10, r"target \[10\] out of range; the model has 10"),
    (torch.rand(2, 3, SIDE, SIDE), [1, 2, 3], "one int or 2 ints"),
    (torch.rand(2, 3, SIDE, SIDE), torch.tensor([0.5, 1.0]), "integers"),
    (torch.rand(2, 3, SIDE, SIDE), "3", "target must be"),
])
def test_bad_inputs_are_refused(resnet: nn.Module, images: torch.Tensor, target: object,
                                match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attribute(resnet, images, target, "Saliency")


# --------------------------------------------------------------------------------------------
# Every method
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_leaves_the_model_alone(resnet: nn.Module, method: str) -> None:
    model = copy.deepcopy(resnet).train()
    model.layers[0].requires_grad_(False)
    before = model_state(model)
    x = smooth_images(2)
    attr = attribute(model, x, torch.tensor([3, 6]), method, **FAST.get(method, {}))
    assert same_state(before, model_state(model))
    assert isinstance(attr, Attribution) and attr.method == method and len(attr) == 2
    assert attr.map.shape == x.shape and torch.isfinite(attr.map).all()
    assert attr.map.abs().amax((1, 2, 3)).min() > 0
    assert attr.target.tolist() == [3, 6] and attr.seconds > 0
    assert attr.sum2d.shape == attr.abs2d.shape == (2, SIDE, SIDE)
    assert (attr.abs2d >= attr.sum2d.abs() - 1e-6).all()
    assert set(attr.maps2d()) == {"sum", "abs"}
    if method in ("GuidedBackprop", "GuidedGradCam"):
        assert attr.info["guided_relus"] == sum(isinstance(m, nn.ReLU) for m in model.modules())


@pytest.mark.parametrize("arch", ["mobilenetv2", "convnext"])
@pytest.mark.usefixtures("seeded")
def test_every_method_but_lrp_on_non_relu_networks(arch: str) -> None:
    model = build_model(arch, width=4, image_size=32).eval()
    x = smooth_images(1, seed=9, side=32)
    for method in METHODS:
        if method == "LRP":
            continue
        attr = attribute(model, x, 1, method, **FAST.get(method, {}))
        assert attr.map.shape == x.shape and torch.isfinite(attr.map).all()
        if method in ("GuidedBackprop", "GuidedGradCam"):
            assert attr.info["guided_relus"] == 0  # Captum guides nn.ReLU only


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_unbatched(resnet: nn.Module, method: str) -> None:
    x, targets = smooth_images(3, seed=1), torch.tensor([1, 5, 1])
    options = FAST.get(method, {})
    batched = attribute(resnet, x, targets, method, **options).map
    single = torch.cat([attribute(resnet, x[i:i + 1], int(targets[i]), method, **options).map
                        for i in range(3)])
    # Batching changes only the order of float32 summation inside the network's reductions, so
    # the two maps may differ by rounding of the quantities they are computed from: a map that
    # is a difference of model outputs (Occlusion, and Lime's regression on them) inherits the
    # rounding of the logits, not of the (much smaller) map; a gradient map that of its own
    # entries. Each value passes through ~20 layers of sums of up to a few hundred terms, so
    # we allow 2**10 units of float32 round-off (u = 2**-24) of that scale: about 6e-5 relative,
    # far below any change a wrong target or a mixed-up sample would make.
    if method in ("Occlusion", "Lime"):
        with torch.no_grad():
            scale = resnet(x).abs().amax()
    else:
        scale = single.abs().amax()
    tol = 2.0**10 * 2.0**-24 * float(scale)
    torch.testing.assert_close(batched, single, atol=tol, rtol=0)


@pytest.mark.parametrize("method", ["Lime", "GradientShap"])
def test_seeded_methods_are_deterministic(resnet: nn.Module, method: str) -> None:
    x, options = smooth_images(1, seed=2), FAST[method]
    rng = torch.get_rng_state()
    first = attribute(resnet, x, 4, method, seed=11, **options).map
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not consumed
    torch.manual_seed(123)  # a different global state changes nothing
    again = attribute(resnet, x, 4, method, seed=11, **options).map
    other = attribute(resnet, x, 4, method, seed=12, **options).map
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_saliency_keeps_the_sign_by_default(resnet: nn.Module) -> None:
    x = smooth_images(2).requires_grad_(True)
    targets = torch.tensor([2, 6])
    resnet(x).gather(1, targets[:, None]).sum().backward()
    attr = attribute(resnet, x.detach(), targets, "Saliency")
    torch.testing.assert_close(attr.map, x.grad)
    assert (attr.map < 0).any() and (attr.map > 0).any()
    absolute = attribute(resnet, x.detach(), targets, "Saliency", abs=True)
    torch.testing.assert_close(absolute.map, x.grad.abs())
    torch.testing.assert_close(absolute.sum2d, attr.abs2d)
    ixg = attribute(resnet, x.detach(), targets, "InputXGradient")
    torch.testing.assert_close(ixg.map, x.detach() * x.grad)


def test_integrated_gradients_completeness(resnet: nn.Module) -> None:
    x, targets = smooth_images(2, seed=3), torch.tensor([0, 9])
    attr = attribute(resnet, x, targets, "IntegratedGradients", n_steps=64)
    with torch.no_grad():
        gap = (resnet(x) - resnet(torch.zeros_like(x))).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(attr.map.sum((1, 2, 3)), gap, atol=1e-2 * float(gap.abs().max()),
                               rtol=0)
    torch.testing.assert_close(attr.info["convergence_delta"], attr.map.sum((1, 2, 3)) - gap,
                               atol=1e-5, rtol=0)


def test_occlusion_window_scales_with_the_image(resnet: nn.Module) -> None:
    assert occlusion_window(32, 32) == (4, 2)
    assert occlusion_window(224, 224) == (28, 14)
    assert occlusion_window(8, 12) == (2, 1)
    attr = attribute(resnet, smooth_images(1), 0, "Occlusion")
    assert (attr.options["window"], attr.options["stride"]) == (2, 1)
    with pytest.raises(ValueError, match="larger than the image"):
        attribute(resnet, smooth_images(1), 0, "Occlusion", window=SIDE + 1)


def test_options_are_resolved_into_a_new_dict(resnet: nn.Module) -> None:
    """Automatic option values come back from Method.resolve; the caller's dict stays as given."""
    x = smooth_images(2)
    given = {"window": None, "stride": 1}
    resolved = get_method("Occlusion").resolve(given, resnet, x)
    assert given == {"window": None, "stride": 1}
    assert resolved == {"window": 2, "stride": 1, "baseline": 0.0, "perturbations_per_eval": 64}
    assert attribute(resnet, x, 0, "Occlusion", **given).options == resolved
    assert get_method("Occlusion").resolve(given) == {**given, "baseline": 0.0,
                                                      "perturbations_per_eval": None}
    assert get_method("GuidedGradCam").resolve({}, resnet, x)["layer"] == "layers"
    assert get_method("IntegratedGradients").resolve({}, resnet, x)["internal_batch_size"] == 128
    with pytest.raises(ValueError, match="option stride must be an integer >= 1"):
        get_method("Occlusion").resolve({"stride": 0}, resnet, x)


def test_lime_maps_are_constant_on_superpixels(resnet: nn.Module) -> None:
    x = smooth_images(1, seed=4)
    attr = attribute(resnet, x, 1, "Lime", **FAST["Lime"])
    labels = superpixels(x[0], FAST["Lime"]["n_segments"], 10.0)
    assert attr.info["n_superpixels"] == [int(labels.max()) + 1] and labels.max() >= 3
    values = attr.map[0, 0]
    for k in range(int(labels.max()) + 1):
        assert values[labels == k].unique().numel() == 1
    assert torch.equal(attr.map[0, 0], attr.map[0, 2])


def test_gradient_shap_baselines() -> None:
    like = torch.rand(2, 3, 5, 5)
    refs = gradient_shap_baselines(like, 3, seed=0)
    assert refs.shape == (4, 3, 5, 5) and torch.equal(refs[0], torch.zeros(3, 5, 5))
    assert torch.equal(refs, gradient_shap_baselines(like, 3, seed=0))
    assert 0 <= refs.min() and refs.max() <= 1 and refs[1:].std() > 0.2


@pytest.mark.parametrize(("arch", "layer"), [("resnet20", "layers"), ("resnet18", "layers"),
                                             ("mobilenetv2", "head"), ("convnext", "stages")])
@pytest.mark.usefixtures("seeded")
def test_grad_cam_layer_is_the_last_conv_stage(arch: str, layer: str) -> None:
    model = build_model(arch, width=4, image_size=32).eval()
    assert default_cam_layer(model, torch.rand(1, 3, 32, 32)) == layer


def test_grad_cam_layer_option(resnet: nn.Module) -> None:
    x = smooth_images(1)
    auto = attribute(resnet, x, 2, "GuidedGradCam")
    named = attribute(resnet, x, 2, "GuidedGradCam", layer="layers.2")
    assert auto.options["layer"] == "layers"
    torch.testing.assert_close(auto.map, named.map)  # the stage's output is the same map
    earlier = attribute(resnet, x, 2, "GuidedGradCam", layer="layers.1")
    assert not torch.allclose(auto.map, earlier.map)
    with pytest.raises(ValueError, match="no submodule named 'layer4'"):
        attribute(resnet, x, 2, "GuidedGradCam", layer="layer4")


def test_spade_option_equals_trace_then_attribute(resnet: nn.Module) -> None:
    """``spade=`` prunes one copy per image and attributes on it; the dense model is untouched."""
    import spade_lib
    from spade_lib.trace import trace

    images = smooth_images(2, seed=5)
    before = model_state(resnet)
    options = {"sparsity": 0.8, "n_augmentations": 8, "seed": 3}
    got = spade_lib.attribute(resnet, images, [1, 4], "Saliency", spade=options)
    for i, t in enumerate([1, 4]):
        pruned = trace(resnet, images[i], **options).model
        want = attribute(pruned, images[i:i + 1], t, "Saliency").map
        assert torch.equal(got.map[i:i + 1], want)
    dense = attribute(resnet, images, [1, 4], "Saliency").map
    assert not torch.allclose(got.map, dense)
    assert len(got.info["traces"]) == 2 and got.options["spade"] == options
    assert same_state(before, model_state(resnet))


def test_supported_methods_leave_lrp_out_of_non_relu_networks(resnet: nn.Module) -> None:
    assert supported_methods(resnet) == list(METHODS)
    for arch in ("mobilenetv2", "convnext"):
        model = build_model(arch, width=4, image_size=32)
        assert supported_methods(model) == [m for m in METHODS if m != "LRP"]
    assert supported_methods(resnet, ["Saliency", "LRP"]) == ["Saliency", "LRP"]
