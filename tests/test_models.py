"""Models: shapes, no reused or in-place activations, every Captum method works on each."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from captum.attr import (
    DeepLift,
    GradientShap,
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    Lime,
    Occlusion,
    Saliency,
)
from torch import nn

from spade_lib.models import (
    ARCHS,
    LayerNorm2d,
    build_model,
    device_of,
    make_attribution_safe,
    predict,
)

SMALL = ["resnet20", "resnet18", "mobilenetv2", "convnext"]


def _side(arch: str) -> int:
    return 64 if arch.startswith("tv_") else 32


def _activation_calls(model: nn.Module, x: torch.Tensor) -> dict[nn.Module, int]:
    calls: dict[nn.Module, int] = {}
    acts = (nn.ReLU, nn.ReLU6, nn.GELU)

    def count(module: nn.Module, inputs: object, output: object) -> None:
        calls[module] = calls.get(module, 0) + 1

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, acts)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.usefixtures("seeded")
def test_output_shape_and_activations_used_once_not_inplace(arch: str) -> None:
    model = build_model(arch, num_classes=7, width=8, image_size=_side(arch)).eval()
    x = torch.rand(2, 3, _side(arch), _side(arch))
    assert model(x).shape == (2, 7)
    calls = _activation_calls(model, x)
    assert calls and max(calls.values()) == 1, "an activation module is applied twice"
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.usefixtures("seeded")
def test_convnext_norm_normalises_each_pixel_over_its_channels() -> None:
    x = 3 * torch.randn(2, 6, 5, 4) + 1
    norm = LayerNorm2d(6)
    out = norm(x)
    assert out.shape == x.shape
    assert torch.allclose(out.mean(1), torch.zeros(2, 5, 4), atol=1e-5)
    assert torch.allclose(out.var(1, unbiased=False), torch.ones(2, 5, 4), atol=1e-3)
    cl = norm(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(cl, out, atol=1e-6)


def test_torchvision_resnet_needed_the_rewiring() -> None:
    raw = torchvision.models.resnet50()
    calls = _activation_calls(raw.eval(), torch.rand(1, 3, 64, 64))
    assert max(calls.values()) == 3  # one ReLU module used three times per bottleneck
    fixed = make_attribution_safe(copy.deepcopy(raw)).eval()
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(raw(x), fixed(x), atol=1e-5)  # same function, separate modules


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "tv_resnet50"])
def test_deeplift_is_complete_on_relu_networks(arch: str) -> None:
    """DeepLift's rescale rule sums to f(x) - f(0) only if every ReLU is its own module."""
    torch.manual_seed(1)
    model = build_model(arch, 10, 8, _side(arch)).eval()
    x = torch.rand(2, 3, _side(arch), _side(arch))
    attr, delta = DeepLift(model).attribute(x, target=3, return_convergence_delta=True)
    gap = (model(x) - model(torch.zeros_like(x)))[:, 3].detach()
    tol = 1e-3 * (1 + float(gap.abs().max()))
    assert torch.allclose(attr.sum((1, 2, 3)), gap, atol=tol)
    assert float(delta.abs().max()) < tol


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.usefixtures("seeded")
def test_every_captum_method_runs(arch: str) -> None:
    s = _side(arch)
    model = build_model(arch, 10, 8, s).eval()
    x, t = torch.rand(2, 3, s, s), torch.tensor([1, 2])
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    blocks = (torch.arange(s * s).reshape(1, 1, s, s) // (s * s // 16)).expand(1, 3, s, s)
    results = {
        "Saliency": Saliency(model).attribute(x, target=t),
        "InputXGradient": InputXGradient(model).attribute(x, target=t),
        "DeepLift": DeepLift(model).attribute(x, target=t),
        "GuidedBackprop": GuidedBackprop(model).attribute(x, target=t),
        "GuidedGradCam": GuidedGradCam(model, last_conv).attribute(x, target=t),
        "IntegratedGradients": IntegratedGradients(model).attribute(x, target=t, n_steps=4),
        "GradientShap": GradientShap(model).attribute(x, target=t, baselines=torch.zeros_like(x),
                                                      n_samples=2),
        "Occlusion": Occlusion(model).attribute(x, target=t, sliding_window_shapes=(3, 8, 8),
                                                strides=(3, 8, 8)),
        "Lime": Lime(model).attribute(x[:1], target=1, n_samples=8, feature_mask=blocks),
    }
    for name, attr in results.items():
        assert attr.shape[1:] == x.shape[1:], name
        assert torch.isfinite(attr).all(), name
    # The hook-based methods must see a gradient; the perturbation ones (Lime, Occlusion) can be
    # legitimately all-zero on a random network whose logits hardly move.
    for name in ("Saliency", "InputXGradient", "DeepLift", "GuidedBackprop", "GuidedGradCam",
                 "IntegratedGradients", "GradientShap"):
        assert results[name].abs().sum() > 0, name


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="'vgg'.*resnet18"):
        build_model("vgg")
    with pytest.raises(ValueError, match="image_size 4"):
        build_model("resnet18", image_size=4)
    with pytest.raises(ValueError, match="pretrained"):
        build_model("resnet20", pretrained=True)


def test_device_of() -> None:
    assert device_of(nn.Linear(2, 2)) == torch.device("cpu")
    bn_only = nn.BatchNorm2d(2, affine=False)
    assert device_of(bn_only) == torch.device("cpu")
    assert device_of(nn.ReLU(), default="meta") == torch.device("meta")
    with pytest.raises(ValueError, match="ReLU has no parameters or buffers"):
        device_of(nn.ReLU(), default=None)


@pytest.mark.usefixtures("seeded")
def test_predict_reads_uint8_and_restores_every_flag() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Dropout(0.9), nn.Linear(6, 3))
    net.train()
    net[2].eval()  # a mixed state: every module's own flag must come back
    images = torch.randint(0, 256, (7, 3, 2, 2), dtype=torch.uint8)
    got = predict(net, images, batch_size=3)
    flags = [m.training for m in net.modules()]
    assert flags == [True, True, True, False, True]
    with torch.no_grad():
        net.eval()
        want = net(images.float() / 255.0).argmax(1)
    assert torch.equal(got, want) and got.dtype == torch.long
    assert predict(net, images[:0]).shape == (0,)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        predict(net, images, batch_size=0)
