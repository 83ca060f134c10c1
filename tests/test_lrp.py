"""LRP (spade_lib.lrp): refused networks, canonizers that keep the function, relevance
conservation, and the rules against a hand computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from nets import model_state, positive_convs, randomize_bn, same_state, smooth_images
from torch import nn
from zennit.canonizers import CompositeCanonizer, SequentialMergeBatchNorm

from spade_lib.attribution import attribute
from spade_lib.lrp import lrp_canonizers, lrp_composite, lrp_relevance
from spade_lib.models import BasicBlock, build_model

SIDE = 16

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("arch", "activation"), [("mobilenetv2", "ReLU6"),
                                                  ("convnext", "GELU")])
def test_lrp_refused_on_non_relu_networks(arch: str, activation: str) -> None:
    model = build_model(arch, width=4, image_size=32)
    with pytest.raises(ValueError, match=f"LRP needs a ReLU network.*{activation}"):
        attribute(model, torch.rand(1, 3, 32, 32), 0, "LRP")


@pytest.mark.usefixtures("seeded")
def test_lrp_canonizers_keep_the_function() -> None:
    model = randomize_bn(build_model("resnet18", width=4, image_size=SIDE), seed=2)
    work = copy.deepcopy(model)
    x = smooth_images(2, seed=5)
    reference = model(x)
    instances = CompositeCanonizer(lrp_canonizers()).apply(work)
    merged = [m for m in work.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in merged)
    assert sum(hasattr(m, "canonizer_sum") for m in work.modules()) == 8  # every block
    torch.testing.assert_close(work(x), reference, atol=1e-5, rtol=1e-5)
    for instance in instances:
        instance.remove()
    assert same_state(model_state(model), model_state(work))


@pytest.mark.parametrize("arch", ["resnet18", "resnet20"])
@pytest.mark.usefixtures("seeded")
def test_lrp_conserves_relevance(arch: str) -> None:
    x = smooth_images(3, seed=6)
    # zero BatchNorm shifts and fc bias (every merged bias is 0), non-negative conv weights
    model = positive_convs(randomize_bn(build_model(arch, width=4, image_size=SIDE), 3,
                                        shift=False))
    model.fc.bias.data.zero_()
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    tight = attribute(model, x, target, "LRP", stabilizer=1e-10, epsilon=1e-10)
    start = tight.info["output_relevance"]
    torch.testing.assert_close(start, logits.gather(1, target[:, None])[:, 0], rtol=1e-4, atol=0)
    torch.testing.assert_close(tight.map.sum((1, 2, 3)), start, rtol=1e-5, atol=0)
    default = attribute(model, x, target, "LRP")  # stabilizer 1e-6 leaks about 1e-5 here
    torch.testing.assert_close(default.map.sum((1, 2, 3)), start, rtol=1e-4, atol=0)
    # without the residual canonizer each addition doubles the relevance (gradient of a sum)
    plain = lrp_composite(canonizers=[SequentialMergeBatchNorm()])
    doubled, _ = lrp_relevance(copy.deepcopy(model), x, target, plain)
    blocks = sum(isinstance(m, BasicBlock) for m in model.modules())
    torch.testing.assert_close(doubled.sum((1, 2, 3)), start * 2**blocks, rtol=1e-3, atol=0)
    # biases absorb relevance, unless zero_bias=True leaves them out of the rules
    biased = positive_convs(randomize_bn(build_model(arch, width=4, image_size=SIDE), seed=4))
    out = attribute(biased, x, target, "LRP", zero_bias=True, stabilizer=1e-10, epsilon=1e-10)
    total = out.info["output_relevance"]
    torch.testing.assert_close(out.map.sum((1, 2, 3)), total, rtol=1e-5, atol=0)
    absorbed = attribute(biased, x, target, "LRP").map.sum((1, 2, 3))
    assert ((absorbed - total).abs() > 0.05 * total.abs()).all()


def test_lrp_conservation_on_general_weights() -> None:
    """With weights of both signs, a neuron whose inputs are all negative contributions has no
    z-plus share to pass its relevance on; on random ResNets that loses well under 1%."""
    x = smooth_images(3, seed=6)
    for seed in range(2):
        torch.manual_seed(seed)
        model = randomize_bn(build_model("resnet18", width=8, image_size=SIDE), seed, False)
        model.fc.bias.data.zero_()
        target = model(x).argmax(1)
        attr = attribute(model, x, target, "LRP", stabilizer=1e-10, epsilon=1e-10)
        torch.testing.assert_close(attr.map.sum((1, 2, 3)), attr.info["output_relevance"],
                                   rtol=1e-2, atol=0)


@pytest.mark.usefixtures("seeded")
def test_lrp_on_torchvision_resnet50() -> None:
    """The three-ReLU bottlenecks of make_attribution_safe are canonized too."""
    model = randomize_bn(build_model("tv_resnet50", image_size=32), seed=5)
    x = smooth_images(1, seed=8, side=32)
    target = model(x).argmax(1)
    attr = attribute(model, x, target, "LRP", zero_bias=True, stabilizer=1e-10, epsilon=1e-10)
    torch.testing.assert_close(attr.map.sum((1, 2, 3)), attr.info["output_relevance"],
                               rtol=1e-3, atol=0)


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + ((z == 0) + z.sign()) * eps


def _relevance_in(fn: object, inputs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``inputs * d(fn(inputs) . s)/d inputs``: the LRP reducer for a linear map ``fn``."""
    inputs = inputs.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad((fn(inputs) * s).sum(), inputs)
    return inputs.detach() * grad


@pytest.mark.usefixtures("seeded")
def test_lrp_rules_match_a_hand_computation() -> None:
    """Box rule on the first conv, z-plus on the second, epsilon on the dense layer."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    c1, c2, fc = net[0], net[2], net[6]
    x, target, eps = smooth_images(1, seed=7, side=6), 1, 1e-6
    attr = attribute(net, x, target, "LRP")

    with torch.no_grad():
        a1 = net[1](c1(x))
        a2 = net[3](c2(a1))
        pooled = a2.mean((2, 3))
        logits = fc(pooled)
    r_out = torch.zeros_like(logits)
    r_out[0, target] = logits[0, target]
    r_pooled = _relevance_in(fc, pooled, r_out / _stab(logits, eps))
    r_a2 = a2 * (r_pooled / _stab(pooled, eps))[:, :, None, None] / a2[0, 0].numel()
    w2p, b2p = c2.weight.clamp(min=0), c2.bias.clamp(min=0)
    z2 = F.conv2d(a1, w2p, b2p, padding=1)
    r_a1 = _relevance_in(lambda v: F.conv2d(v, w2p, padding=1), a1, r_a2 / _stab(z2, eps))
    w1, w1p, w1n = c1.weight, c1.weight.clamp(min=0), c1.weight.clamp(max=0)
    low, high = torch.zeros_like(x), torch.ones_like(x)
    z1 = (F.conv2d(x, w1, padding=1) - F.conv2d(low, w1p, padding=1)
          - F.conv2d(high, w1n, padding=1))
    s1 = r_a1 / _stab(z1, eps)
    r_x = (_relevance_in(lambda v: F.conv2d(v, w1, padding=1), x, s1)
           - _relevance_in(lambda v: F.conv2d(v, w1p, padding=1), low, s1)
           - _relevance_in(lambda v: F.conv2d(v, w1n, padding=1), high, s1))
    torch.testing.assert_close(attr.map, r_x, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(attr.map, attribute(net, x, target, "InputXGradient").map)
